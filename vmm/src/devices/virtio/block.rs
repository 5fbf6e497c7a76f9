//! virtio-blk (in progress).
pub struct Block;
