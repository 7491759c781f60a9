//! `--scrape-metrics`: reads Switchyard workers' Prometheus endpoints before and after the measured
//! run, and reports the mean expert-dispatch latency per layer over the run (from the
//! `switchyard_dispatch_seconds{layer}` histogram's `_sum` and `_count`).

use std::collections::BTreeMap;

use serde::Serialize;

/// Per layer: (sum of seconds, count), summed over every scraped endpoint.
pub type DispatchTotals = BTreeMap<u32, (f64, f64)>;

#[derive(Clone, Debug, Serialize)]
pub struct LayerDispatch {
    pub layer: u32,
    /// Expert-phase calls during the run (one per layer per engine step, per attention worker).
    pub calls: u64,
    pub mean_ms: f64,
}

/// Parses the dispatch histogram's `_sum` and `_count` series out of Prometheus text.
pub fn parse(text: &str, into: &mut DispatchTotals) {
    for line in text.lines() {
        let (which, rest) = if let Some(r) = line.strip_prefix("switchyard_dispatch_seconds_sum{") {
            (0, r)
        } else if let Some(r) = line.strip_prefix("switchyard_dispatch_seconds_count{") {
            (1, r)
        } else {
            continue;
        };
        let Some(layer) = rest.split("layer=\"").nth(1).and_then(|r| r.split('"').next()).and_then(|l| l.parse::<u32>().ok()) else {
            continue;
        };
        let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        let e = into.entry(layer).or_default();
        if which == 0 {
            e.0 += value;
        } else {
            e.1 += value;
        }
    }
}

pub async fn scrape(urls: &[String]) -> DispatchTotals {
    let mut totals = DispatchTotals::new();
    let client = reqwest::Client::new();
    for url in urls {
        match client.get(url).send().await {
            Ok(r) => match r.text().await {
                Ok(t) => parse(&t, &mut totals),
                Err(e) => eprintln!("--scrape-metrics {url}: {e}"),
            },
            Err(e) => eprintln!("--scrape-metrics {url}: {e}"),
        }
    }
    totals
}

/// The per-layer means over the run: `after - before`.
pub fn delta(before: &DispatchTotals, after: &DispatchTotals) -> Vec<LayerDispatch> {
    after
        .iter()
        .filter_map(|(&layer, &(s1, c1))| {
            let (s0, c0) = before.get(&layer).copied().unwrap_or_default();
            let calls = c1 - c0;
            (calls > 0.0).then(|| LayerDispatch { layer, calls: calls as u64, mean_ms: (s1 - s0) / calls * 1e3 })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_histogram_and_takes_the_delta() {
        let before = "switchyard_dispatch_seconds_sum{layer=\"0\"} 0.5\nswitchyard_dispatch_seconds_count{layer=\"0\"} 10\n";
        let after = "# TYPE x summary\nswitchyard_dispatch_seconds_sum{layer=\"0\"} 0.9\nswitchyard_dispatch_seconds_count{layer=\"0\"} 30\n\
                     switchyard_dispatch_seconds_sum{layer=\"1\"} 0.2\nswitchyard_dispatch_seconds_count{layer=\"1\"} 20\n\
                     switchyard_dispatch_seconds_bucket{layer=\"1\",le=\"0.1\"} 20\n";
        let (mut b, mut a) = (DispatchTotals::new(), DispatchTotals::new());
        parse(before, &mut b);
        parse(after, &mut a);
        let d = delta(&b, &a);
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].layer, d[0].calls), (0, 20));
        assert!((d[0].mean_ms - 20.0).abs() < 1e-9);
        assert!((d[1].mean_ms - 10.0).abs() < 1e-9);
    }
}
