//! The configured virtio devices, in the order they get their MMIO windows and GSIs: disks, vsock, rng
//! ([`create_devices`]), then the virtio-fs devices (`fs::create_devices`), then net ([`create_net_devices`]).

use crate::config::VmConfig;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::net::{random_mac, Net, Tap};
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
        let letter = (b'a' + (i % 26) as u8) as char;
        let name = format!("block vd{letter} ({})", disk.path.display());
        // The guest-visible id never comes from the host file (its inode would leak).
        let id = disk
            .id
            .clone()
            .unwrap_or_else(|| format!("capsa-vd{letter}"));
        let dev = Block::new(&disk.path, disk.readonly)
            .map_err(|e| device_err(&name, e))?
            .with_id(&id);
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

/// Creates the virtio-net devices, in `--net` order; they come after every other device so that adding a
/// network card does not move the others' addresses and GSIs.
pub fn create_net_devices(config: &VmConfig) -> Result<Vec<NamedDevice>, Error> {
    let mut devices: Vec<NamedDevice> = Vec::with_capacity(config.net.len());
    for (i, net) in config.net.iter().enumerate() {
        let what = match (&net.tap, net.fd) {
            (Some(name), _) => format!("tap {name}"),
            (None, Some(fd)) => format!("fd {fd}"),
            (None, None) => "no tap".to_string(),
        };
        let mut name = format!("net eth{i} ({what})");
        let tap = match (&net.tap, net.fd) {
            (Some(tap), None) => Tap::open(tap),
            (None, Some(fd)) => Tap::from_fd(fd),
            _ => {
                return Err(Error::Config(crate::config::ConfigError::Invalid(
                    "net needs exactly one of tap=NAME or fd=N".into(),
                )))
            }
        }
        .map_err(|e| device_err(&name, e))?;
        if net.tap.is_none() {
            name = format!(
                "net eth{i} (fd {}, tap {})",
                net.fd.unwrap_or(-1),
                tap.name()
            );
        }
        let mac = net.mac.map_or_else(random_mac, |m| m.0);
        // The configuration checked the range.
        let mtu = net.mtu.and_then(|m| u16::try_from(m).ok());
        tracing::info!(
            device = %name,
            mac = %crate::config::MacAddr(mac),
            mtu = ?mtu,
            "net: guest interface"
        );
        devices.push((name, Box::new(Net::new(tap, mac, mtu))));
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::config::{MacAddr, NetConfig};

    #[test]
    fn net_devices_are_separate_and_check_what_they_open() {
        let mut c = VmConfig::new("/k");
        c.rng = true;
        // A descriptor that is not a tap: a device error naming it (and the fd is left alone).
        let f = tempfile::tempfile().unwrap();
        c.net = vec![NetConfig {
            tap: None,
            fd: Some(f.as_raw_fd()),
            mac: None,
            mtu: None,
        }];
        let e = create_net_devices(&c).err().expect("not a tap").to_string();
        assert!(
            e.contains("not a tap") && e.contains(&format!("fd {}", f.as_raw_fd())),
            "{e}"
        );
        // The other devices do not include net (it is appended after fs by the VMM).
        let others = create_devices(&c).unwrap();
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].1.device_type(), 4);

        let name = format!("cvw{}", std::process::id() % 1_000_000);
        c.net = vec![NetConfig {
            tap: Some(name.clone()),
            fd: None,
            mac: Some(MacAddr([0x52, 0x54, 0, 1, 2, 3])),
            mtu: Some(1400),
        }];
        let devs = match create_net_devices(&c) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipping the tap part: {e}");
                return;
            }
        };
        assert_eq!(devs.len(), 1);
        assert!(devs[0].0.contains(&name), "{}", devs[0].0);
        assert_eq!(devs[0].1.device_type(), 1);
        let mut cfg = [0u8; 12];
        devs[0].1.read_config(0, &mut cfg);
        assert_eq!(&cfg[..6], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1400);
    }
}
