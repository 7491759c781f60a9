//! A server that nobody scrapes must not keep its histogram samples: the exporter holds each one until
//! it is folded into its buckets, so without upkeep every request left tens of bytes behind for good
//! (the overload soak saw ~160 bytes a request). Its own test binary, so its memory is its own.

use std::time::Duration;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).expect("VmRSS");
    kb * 1024
}

#[test]
fn histogram_samples_do_not_pile_up_without_scrapes() {
    let _handle = switchyard_router::metrics::handle().expect("the recorder installs");
    let h = metrics::histogram!("vllm:e2e_request_latency_seconds", "model_name" => "m", "engine" => "0");
    // 2M samples a round: 16 MB of raw f64s if they were kept.
    let round = || {
        for i in 0..2_000_000u32 {
            h.record(f64::from(i) * 1e-6);
        }
        std::thread::sleep(switchyard_router::metrics::UPKEEP_INTERVAL.mul_f32(1.5) + Duration::from_millis(200));
    };
    round();
    let base = rss_bytes();
    for _ in 0..4 {
        round();
    }
    let grown = rss_bytes().saturating_sub(base);
    // Kept samples would add 64 MB over four rounds; drained ones reuse the first round's memory.
    assert!(grown < 16 << 20, "RSS grew {} MB over 8M unscraped samples", grown >> 20);
}
