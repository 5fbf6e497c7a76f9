//! virtio-mmio register handshake driven by a guest through real KVM MMIO exits, the QueueNotify ioeventfd and
//! the interrupt status set by the device.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsa_vmm::devices::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};
use capsa_vmm::devices::GuestMemoryMmap;
use capsa_vmm::{ExitReason, Vmm, VmmOptions};
use common::*;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

const VERSION_1: u64 = 1 << 32;

#[derive(Default)]
struct Seen {
    acked: Option<u64>,
    queues: usize,
    notify: Option<EventFd>,
}

struct TestDevice {
    seen: Arc<Mutex<Seen>>,
}

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u32 {
        4
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn avail_features(&self) -> u64 {
        VERSION_1
    }
    fn set_acked_features(&mut self, features: u64) {
        self.seen.lock().unwrap().acked = Some(features);
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        let mut seen = self.seen.lock().unwrap();
        seen.queues = queues.len();
        seen.notify = queues.into_iter().next().map(|(_, evt)| evt);
        interrupt.signal_used_queue()?;
        Ok(())
    }
}

#[test]
fn guest_negotiates_features_activates_and_notifies() {
    let base: u32 = 0xd000_0000;
    let r = |off: u32| base + off;
    let mut a = Asm::new();
    a.load32(r(0x000)).print_eax(); // MagicValue
    a.load32(r(0x004)).print_eax(); // Version
    a.load32(r(0x008)).print_eax(); // DeviceID
    a.store32(r(0x070), 1).store32(r(0x070), 3); // ACKNOWLEDGE, DRIVER
    a.store32(r(0x014), 1).load32(r(0x010)).print_eax(); // DeviceFeatures[63:32]
    a.store32(r(0x024), 1).store32(r(0x020), 1); // DriverFeatures[63:32] = VERSION_1
    a.store32(r(0x024), 0).store32(r(0x020), 0);
    a.store32(r(0x070), 0xb); // FEATURES_OK
    a.load32(r(0x070)).print_eax();
    a.store32(r(0x030), 0).load32(r(0x034)).print_eax(); // QueueNumMax
    a.store32(r(0x038), 16);
    a.store32(r(0x080), 0x20_0000).store32(r(0x084), 0);
    a.store32(r(0x090), 0x20_1000).store32(r(0x094), 0);
    a.store32(r(0x0a0), 0x20_2000).store32(r(0x0a4), 0);
    a.store32(r(0x044), 1); // QueueReady
    a.store32(r(0x070), 0xf); // DRIVER_OK -> activate
    a.load32(r(0x060)).print_eax(); // InterruptStatus: the device signalled
    a.store32(r(0x064), 1).load32(r(0x060)).print_eax(); // InterruptACK clears it
    a.store32(r(0x050), 0); // QueueNotify(0): caught by the ioeventfd
    a.reset().halt_forever();

    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), "vmlinux", &pvh_kernel(&a.0));
    let mut cfg = config(&kernel);
    cfg.cmdline = "console=ttyS0".into();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let options = VmmOptions {
        extra_virtio_devices: vec![("test".into(), Box::new(TestDevice { seen: seen.clone() }))],
        ..Default::default()
    };
    let sink = Sink::default();
    let vmm = Vmm::with_options(
        cfg,
        VmmOptions {
            serial_out: Some(Box::new(sink.clone())),
            ..options
        },
    )
    .unwrap();
    assert_eq!(
        vmm.kernel_cmdline(),
        "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
    );
    let stop = vmm.stop_flag();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(60));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(vmm.run().unwrap(), ExitReason::GuestReset);

    let out = sink.bytes();
    let words: Vec<u32> = out
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(
        words,
        vec![0x7472_6976, 2, 4, 1, 0xb, 16, 1, 0],
        "magic, version, device id, features hi, status, queue max, isr, isr after ack"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.acked, Some(VERSION_1));
    assert_eq!(seen.queues, 1);
    let notify = seen
        .notify
        .as_ref()
        .expect("queue eventfd handed to the device");
    assert_eq!(
        notify.read().unwrap(),
        1,
        "QueueNotify reached the queue's eventfd"
    );
}

#[test]
fn configured_devices_get_windows_gsis_and_cmdline_entries_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Asm::new();
    a.reset();
    let kernel = write_kernel(dir.path(), "vmlinux", &pvh_kernel(&a.0));
    let disk_a = dir.path().join("a.img");
    let disk_b = dir.path().join("b.img");
    std::fs::write(&disk_a, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&disk_b, vec![0u8; 1 << 20]).unwrap();
    let uds = dir.path().join("v.sock");
    let mut cfg = config(&kernel);
    cfg.cmdline = "quiet".into();
    cfg.disks = vec![
        capsa_vmm::DiskConfig {
            path: disk_a,
            readonly: false,
            id: None,
        },
        capsa_vmm::DiskConfig {
            path: disk_b,
            readonly: true,
            id: None,
        },
    ];
    cfg.vsock = Some(capsa_vmm::VsockConfig {
        cid: 3,
        uds: uds.clone(),
    });
    cfg.rng = true;
    let vmm = Vmm::with_options(
        cfg,
        VmmOptions {
            serial_out: Some(Box::new(Sink::default())),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        vmm.kernel_cmdline(),
        "quiet virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
         virtio_mmio.device=4K@0xd0002000:7 virtio_mmio.device=4K@0xd0003000:8"
    );
    assert!(uds.exists());
    assert_eq!(vmm.run().unwrap(), ExitReason::GuestReset);
    assert!(!uds.exists(), "vsock socket removed when the VM ends");
}
