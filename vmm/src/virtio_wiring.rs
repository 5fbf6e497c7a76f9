//! The configured virtio devices (disks, vsock, rng), in the order they get their MMIO windows and GSIs.

use crate::config::VmConfig;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::vmm::Error;

/// A virtio device and the name it is logged under.
pub type NamedDevice = (String, Box<dyn VirtioDevice>);

fn device_err(name: &str, e: impl std::fmt::Display) -> Error {
    Error::Device {
        name: name.to_string(),
        reason: e.to_string(),
    }
}

/// Creates the devices `config` asks for: disks first (vda, vdb, ...), then vsock, then rng.
pub fn create_devices(config: &VmConfig) -> Result<Vec<NamedDevice>, Error> {
    let mut devices: Vec<NamedDevice> = Vec::with_capacity(config.virtio_device_count());
    for (i, disk) in config.disks.iter().enumerate() {
        let name = format!(
            "block vd{} ({})",
            (b'a' + (i % 26) as u8) as char,
            disk.path.display()
        );
        let dev = Block::new(&disk.path, disk.readonly).map_err(|e| device_err(&name, e))?;
        devices.push((name, Box::new(dev)));
    }
    if let Some(v) = &config.vsock {
        let name = format!("vsock cid {} ({})", v.cid, v.uds.display());
        let dev = Vsock::new(u64::from(v.cid), &v.uds).map_err(|e| device_err(&name, e))?;
        devices.push((name, Box::new(dev)));
    }
    if config.rng {
        let name = "rng".to_string();
        let dev = Rng::new().map_err(|e| device_err(&name, e))?;
        devices.push((name, Box::new(dev)));
    }
    Ok(devices)
}
