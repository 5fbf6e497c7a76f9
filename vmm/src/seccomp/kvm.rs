//! The ioctl request numbers the filters name (Linux `_IO`/`_IOW` encoding, x86_64).

/// `_IO(type, nr)`.
const fn io(ty: u64, nr: u64) -> u64 {
    (ty << 8) | nr
}

/// KVM's ioctl type (`KVMIO`).
const KVMIO: u64 = 0xae;

/// `KVM_RUN`: the only KVM ioctl a running VM needs (everything else happens during setup).
pub const KVM_RUN: u64 = io(KVMIO, 0x80);

/// The tap ioctl a net device issues when the guest activates it (offloads follow the acked features).
pub const TUNSETOFFLOAD: u64 = libc::TUNSETOFFLOAD;

/// `FIONBIO`, which std's `set_nonblocking` on sockets uses (vsock host connections).
pub const FIONBIO: u64 = libc::FIONBIO;

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_match_the_kernel_headers() {
        assert_eq!(super::KVM_RUN, 0xae80);
        assert_eq!(super::TUNSETOFFLOAD, 0x4004_54d0);
        assert_eq!(super::FIONBIO, 0x5421);
    }
}
