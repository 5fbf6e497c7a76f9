//! virtio-rng (in progress).
pub struct Rng;
