//! capsa-bench: boot-time and memory-overhead benchmarks (work in progress).
fn main() {
    eprintln!("capsa-bench: not implemented yet");
    std::process::exit(1);
}
