//! Address-range buses (port I/O and MMIO) that vCPU exits are dispatched to.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::devices::BusDevice;

/// A device shared between the bus and whoever else needs it (tests, the stdin thread, ...).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overflows")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a registered device")]
    Overlap { base: u64, len: u64 },
}

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// Maps non-overlapping `[base, base + len)` ranges to devices.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => return Err(BusError::BadRange { base, len }),
        };
        // The closest device starting at or below the last byte of the new range must end before `base`.
        if let Some((&b, e)) = self.devices.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` inside its range.
    fn resolve(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then_some((&entry.device, offset))
    }

    /// Reads from the device at `addr`; returns false when no device covers it (`data` untouched).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; returns false when no device covers it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, carrying on if a previous holder panicked (the device state is still usable).
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        last: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlaps() {
        let rec = Arc::new(Mutex::new(Recorder { last: vec![] }));
        let mut bus = Bus::new();
        bus.insert(rec.clone(), 0x3f8, 8).unwrap();
        assert!(bus.insert(rec.clone(), 0x3f0, 9).is_err());
        assert!(bus.insert(rec.clone(), 0x3ff, 1).is_err());
        assert!(bus.insert(rec.clone(), 0x3f8, 0).is_err());
        assert!(bus.insert(rec.clone(), u64::MAX, 2).is_err());
        bus.insert(rec.clone(), 0x400, 1).unwrap();
        bus.insert(rec.clone(), 0x3f0, 8).unwrap();

        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(!bus.read(0x3e0, &mut b));
        assert!(!bus.read(0x401, &mut b));
        assert!(bus.write(0x3f9, &[7]));
        assert_eq!(rec.lock().unwrap().last, vec![(1, vec![7])]);
    }
}
