fn main() {
    eprintln!("capsa-vmm: not built yet");
    std::process::exit(1);
}
