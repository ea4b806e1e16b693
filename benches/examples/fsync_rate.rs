//! The disk's raw sync rate: how many 4 KiB append + fdatasync rounds per
//! second one thread gets in a directory. This is the ceiling for
//! one-message-per-sync durability; group commit exists to beat it.
//!
//! `cargo run --release -p edgehub-benches --example fsync_rate [dir] [rounds]`

use std::io::Write;
use std::time::Instant;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| ".".into());
    let rounds: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let path = std::path::Path::new(&dir).join(".fsync_rate.tmp");
    let mut f = std::fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    let start = Instant::now();
    for _ in 0..rounds {
        f.write_all(&block)?;
        f.sync_data()?;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    println!(
        "{rounds} x (4 KiB write + fdatasync) in {secs:.3} s: {:.0} syncs/s, {:.1} us each",
        rounds as f64 / secs,
        secs * 1e6 / rounds as f64
    );
    Ok(())
}
