//! CMOS / RTC at ports 0x70 (index) and 0x71 (data): reports the host's current UTC time in BCD, 24-hour mode,
//! never "update in progress", so Linux reads a sane wall clock instead of spinning on the UIP bit.

use std::time::{SystemTime, UNIX_EPOCH};

use tracing::trace;

use crate::devices::BusDevice;

pub struct Cmos {
    index: u8,
    /// Battery-backed RAM the guest may use as scratch (registers 0x0e..0x7f).
    ram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        Self {
            index: 0,
            ram: [0; 128],
        }
    }
}

impl Cmos {
    pub fn new() -> Self {
        Self::default()
    }
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn rtc_register(index: u8, unix_secs: u64) -> Option<u8> {
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let year = year.max(0) as u64;
    Some(match index {
        0x00 => bcd(secs % 60),
        0x02 => bcd(secs / 60 % 60),
        0x04 => bcd(secs / 3600),
        0x06 => bcd(((days + 4).rem_euclid(7) + 1) as u64), // 1970-01-01 was a Thursday; Sunday = 1
        0x07 => bcd(u64::from(day)),
        0x08 => bcd(u64::from(month)),
        0x09 => bcd(year % 100),
        0x32 => bcd(year / 100),
        0x0a => 0x26, // 32.768 kHz base, 1024 Hz rate, UIP clear
        0x0b => 0x02, // 24-hour mode, BCD, no interrupts
        0x0c => 0x00,
        0x0d => 0x80, // RAM and time valid
        _ => return None,
    })
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        if offset == 1 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            *first =
                rtc_register(self.index, now).unwrap_or(self.ram[usize::from(self.index & 0x7f)]);
        } else if offset == 0 {
            *first = self.index;
        }
        trace!(
            "cmos read {offset} index {:#x} -> {:#x}",
            self.index,
            data[0]
        );
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask; keep only the register number.
            0 => self.index = value & 0x7f,
            1 if rtc_register(self.index, 0).is_none() => self.ram[usize::from(self.index)] = value,
            _ => trace!("cmos write {offset} {value:#x} ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn registers_in_bcd() {
        // 2024-02-29 13:45:56 UTC, a Thursday
        let t = 19_782 * 86_400 + 13 * 3600 + 45 * 60 + 56;
        assert_eq!(rtc_register(0, t), Some(0x56));
        assert_eq!(rtc_register(2, t), Some(0x45));
        assert_eq!(rtc_register(4, t), Some(0x13));
        assert_eq!(rtc_register(6, t), Some(0x05));
        assert_eq!(rtc_register(7, t), Some(0x29));
        assert_eq!(rtc_register(8, t), Some(0x02));
        assert_eq!(rtc_register(9, t), Some(0x24));
        assert_eq!(rtc_register(0x32, t), Some(0x20));
        assert_eq!(rtc_register(0x0a, t).map(|a| a & 0x80), Some(0));
    }

    #[test]
    fn ram_and_index() {
        let mut c = Cmos::new();
        c.write(0, &[0x80 | 0x40]);
        c.write(1, &[0x5a]);
        let mut b = [0u8];
        c.read(1, &mut b);
        assert_eq!(b[0], 0x5a);
        c.write(0, &[0x0a]);
        c.read(1, &mut b);
        assert_eq!(b[0] & 0x80, 0);
    }
}
