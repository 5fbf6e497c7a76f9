//! The host side of the pod-network benchmark (capsa-cri-bench's `net` section): TCP throughput to a
//! sink in the pod and from a sender in the pod, and round trips to an echo server in the pod. The pod side
//! is busybox (`nc`, `dd`, `cat`) in the benchmark's container, the same under every runtime.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// The pod's sink reads in blocks of this size (`dd bs=`); transfers are multiples of it.
pub const SINK_BLOCK: u64 = 65536;

/// The benchmark container's command: on `sink_port` a sink that reads everything a connection sends,
/// then answers dd's record counts (`N+M records in`) on the same connection; on `echo_port` an echo
/// server (`cat`). busybox `nc -ll -e` serves connection after connection (its `-e` gives the program the
/// socket as stdin and stdout, not stderr; hence the `2>&1`).
pub fn pod_servers_script(sink_port: u16, echo_port: u16) -> String {
    format!(
        "nc -ll -p {sink_port} -e sh -c 'dd of=/dev/null bs={SINK_BLOCK} iflag=fullblock 2>&1' & \
         nc -ll -p {echo_port} -e cat & exec sleep 86400"
    )
}

/// The pod's sender: `bytes` (a multiple of [`SINK_BLOCK`]) of zeros to `host:port`. `nc` only connects:
/// `dd` writes to the socket itself (relayed through `nc`, whose loop moves 1 KiB per read, the
/// transfer measured busybox more than the network: about 1 MiB/s under both runtimes in the test host).
pub fn pod_sender_script(bytes: u64, host: &str, port: u16) -> String {
    format!(
        "nc {host} {port} -e dd if=/dev/zero bs={SINK_BLOCK} count={}",
        bytes / SINK_BLOCK
    )
}

/// The number of full blocks in a `dd iflag=fullblock` report, or an error when a partial block was read.
pub fn full_blocks_read(report: &str) -> anyhow::Result<u64> {
    let line = report
        .lines()
        .find(|l| l.ends_with("records in"))
        .with_context(|| format!("no \"records in\" in the sink's report {report:?}"))?;
    let counts = line.trim_end_matches("records in").trim();
    let (full, partial) = counts
        .split_once('+')
        .with_context(|| format!("sink report line {line:?}"))?;
    let (full, partial): (u64, u64) = (full.parse()?, partial.parse()?);
    if partial != 0 {
        bail!("the sink read {full} full blocks and {partial} partial ones: bytes were lost");
    }
    Ok(full)
}

/// Connects to the sink at `addr`, sends `bytes` (a multiple of [`SINK_BLOCK`]) and half-closes; returns the time from the connection to
/// the sink's report, once the report says every byte arrived.
pub fn send_to_sink(addr: SocketAddr, bytes: u64, timeout: Duration) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        bytes.is_multiple_of(SINK_BLOCK),
        "{bytes} is not a multiple of {SINK_BLOCK}"
    );
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect to the sink at {addr}"))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_read_timeout(Some(timeout))?;
    let started = Instant::now();
    let chunk = vec![0u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n])
            .with_context(|| format!("sending to {addr} ({} of {bytes} bytes left)", left))?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut report = String::new();
    s.read_to_string(&mut report)
        .with_context(|| format!("reading the sink's report from {addr}"))?;
    let took = started.elapsed();
    let blocks = full_blocks_read(&report)?;
    if blocks * SINK_BLOCK != bytes {
        bail!("the sink got {} bytes of {bytes}", blocks * SINK_BLOCK);
    }
    Ok(took)
}

/// Accepts one connection on `listener` (within `timeout`) and reads it to the end: (bytes, time from
/// the accept to the end of the stream).
pub fn receive_all(listener: &TcpListener, timeout: Duration) -> anyhow::Result<(u64, Duration)> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let mut s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("no connection within {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).context("accept"),
        }
    };
    let started = Instant::now();
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(timeout))?;
    let mut buf = vec![0u8; 1024 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context(format!("receiving (after {total} bytes)")),
        }
    }
    Ok((total, started.elapsed()))
}

/// `warmup` then `n` round trips of `size` bytes to the echo server at `addr` on one connection (no Nagle
/// delay); the `n` measured round trips' times.
pub fn round_trips(
    addr: SocketAddr,
    warmup: usize,
    n: usize,
    size: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect to the echo server at {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut out = vec![0u8; size];
    let mut back = vec![0u8; size];
    let mut times = Vec::with_capacity(n);
    for i in 0..warmup + n {
        for (j, b) in out.iter_mut().enumerate() {
            *b = (i + j) as u8;
        }
        let t = Instant::now();
        s.write_all(&out)?;
        s.read_exact(&mut back)
            .with_context(|| format!("round trip {i}: reading the echo"))?;
        let took = t.elapsed();
        if back != out {
            bail!("round trip {i}: the echo differs from what was sent");
        }
        if i >= warmup {
            times.push(took);
        }
    }
    Ok(times)
}

/// The `p`-th percentile (0..=100, nearest rank) of `values`; zero when empty.
pub fn percentile(values: &[Duration], p: f64) -> Duration {
    let mut v = values.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// MiB per second.
pub fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_report_parsing() {
        assert_eq!(
            full_blocks_read("1024+0 records in\n1024+0 records out\n").unwrap(),
            1024
        );
        assert!(full_blocks_read("1023+1 records in\n1023+1 records out\n").is_err());
        assert!(full_blocks_read("dd: can't open\n").is_err());
    }

    #[test]
    fn percentiles() {
        let ms = Duration::from_millis;
        let v: Vec<Duration> = (1..=10).rev().map(ms).collect();
        assert_eq!(percentile(&v, 50.0), ms(5));
        assert_eq!(percentile(&v, 90.0), ms(9));
        assert_eq!(percentile(&v, 100.0), ms(10));
        assert_eq!(percentile(&v, 0.0), ms(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    /// The host side against loopback stand-ins for the pod's sink, sender and echo server.
    #[test]
    fn host_side_over_loopback() {
        let sink = TcpListener::bind("127.0.0.1:0").unwrap();
        let sink_addr = sink.local_addr().unwrap();
        let sink_thread = std::thread::spawn(move || {
            let (mut s, _) = sink.accept().unwrap();
            let mut n = 0u64;
            let mut buf = [0u8; 65536];
            loop {
                match s.read(&mut buf).unwrap() {
                    0 => break,
                    k => n += k as u64,
                }
            }
            let r = format!(
                "{}+0 records in\n{}+0 records out\n",
                n / SINK_BLOCK,
                n / SINK_BLOCK
            );
            s.write_all(r.as_bytes()).unwrap();
        });
        send_to_sink(sink_addr, 4 * SINK_BLOCK, Duration::from_secs(10)).unwrap();
        sink_thread.join().unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&[7u8; 300_000]).unwrap();
        });
        let (n, _) = receive_all(&listener, Duration::from_secs(10)).unwrap();
        sender.join().unwrap();
        assert_eq!(n, 300_000);

        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut buf = [0u8; 4096];
            while let Ok(k) = s.read(&mut buf) {
                if k == 0 || s.write_all(&buf[..k]).is_err() {
                    break;
                }
            }
        });
        let t = round_trips(echo_addr, 3, 20, 64, Duration::from_secs(10)).unwrap();
        assert_eq!(t.len(), 20);
    }

    #[test]
    fn scripts() {
        assert_eq!(
            pod_sender_script(2 * SINK_BLOCK, "10.0.0.1", 9),
            "nc 10.0.0.1 9 -e dd if=/dev/zero bs=65536 count=2"
        );
        assert!(pod_servers_script(1, 2).contains("nc -ll -p 2 -e cat"));
    }
}
