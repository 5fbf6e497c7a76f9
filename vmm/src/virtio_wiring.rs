//! The configured virtio devices (disks, vsock, rng), in the order they get their MMIO windows and GSIs.

use crate::config::VmConfig;
use crate::devices::virtio::VirtioDevice;
use crate::vmm::Error;

/// A virtio device and the name it is logged under.
pub type NamedDevice = (String, Box<dyn VirtioDevice>);

/// Creates the devices `config` asks for: disks first (vda, vdb, ...), then vsock, then rng.
pub fn create_devices(config: &VmConfig) -> Result<Vec<NamedDevice>, Error> {
    let wanted = config.virtio_device_count();
    if wanted > 0 {
        return Err(Error::Device {
            name: "virtio".into(),
            reason: "virtio devices are not available in this build yet".into(),
        });
    }
    Ok(vec![])
}
