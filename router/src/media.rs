//! Images from `image_url` content parts: `data:` URLs and `http(s)` fetches, under the protections of
//! the reliability checklist's Media section.
//!
//! - Only `data:`, `http:` and `https:` are accepted; anything else is refused before any I/O.
//! - A fetch resolves the host once, refuses the request unless every address is public (or the host is
//!   listed in `--allowed-media-domains`), and then connects to exactly the addresses it checked (the
//!   resolver handed to the HTTP client returns them, so a second lookup cannot be raced). Redirects are
//!   followed by hand, each hop checked the same way.
//! - Bodies are capped in bytes and in time; image dimensions are read from the header and refused past
//!   the pixel cap before anything is decoded; truncated and empty images are refused.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use image::RgbImage;

use crate::error::ApiError;

/// What image fetching is allowed to do.
#[derive(Clone, Debug)]
pub struct MediaPolicy {
    /// Hosts that may be fetched even at private addresses; when non-empty, the only hosts fetched.
    pub allowed_domains: Vec<String>,
    /// Largest body (or decoded `data:` payload), in bytes.
    pub max_bytes: usize,
    /// Whole-fetch deadline, redirects included.
    pub timeout: Duration,
    /// Largest image, in pixels (width x height), read from the header before decoding.
    pub max_pixels: u64,
    pub max_redirects: usize,
}

impl Default for MediaPolicy {
    fn default() -> Self {
        MediaPolicy {
            allowed_domains: Vec::new(),
            max_bytes: 20 << 20,
            timeout: Duration::from_secs(10),
            max_pixels: 8192 * 8192,
            max_redirects: 5,
        }
    }
}

fn refuse(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message.into())
}

/// Whether an address is one a server may reach on a client's behalf: not loopback, private,
/// link-local, shared, multicast, unspecified or reserved, in IPv4 or any IPv6 form that embeds one.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => public_v4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if let Some(v4) = v6.to_ipv4_mapped() {
                return public_v4(v4);
            }
            // IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::/96) and 6to4 (2002::/16) carry an IPv4 address.
            if s[..6] == [0; 6] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
                return !v6.is_unspecified() && !v6.is_loopback() && public_v4(v4);
            }
            if s[0] == 0x2002 {
                return public_v4(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8)) // documentation
        }
    }
}

fn public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared address space (CGNAT)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking
        || o[0] >= 240) // reserved
}

/// The raw bytes of an image URL.
pub async fn fetch(policy: &MediaPolicy, url: &str, param: &str) -> Result<Vec<u8>, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        return data_url(rest, policy.max_bytes, param);
    }
    let parsed = url::Url::parse(url).map_err(|e| refuse(param, format!("not a valid URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(refuse(param, format!("`{}:` URLs are not fetched; use http(s) or data:", parsed.scheme())));
    }
    let policy = policy.clone();
    let param_owned = param.to_string();
    let task = tokio::task::spawn_blocking(move || fetch_http(&policy, parsed, &param_owned));
    task.await.map_err(ApiError::internal)?
}

fn data_url(rest: &str, max_bytes: usize, param: &str) -> Result<Vec<u8>, ApiError> {
    use base64::Engine;
    let (meta, payload) = rest.split_once(',').ok_or_else(|| refuse(param, "a data: URL needs a `,`"))?;
    if !meta.ends_with(";base64") {
        return Err(refuse(param, "only base64 data: URLs are accepted"));
    }
    if payload.len() / 4 * 3 > max_bytes {
        return Err(refuse(param, format!("the image is larger than {max_bytes} bytes")));
    }
    base64::engine::general_purpose::STANDARD.decode(payload.trim()).map_err(|e| refuse(param, format!("bad base64 in the data: URL: {e}")))
}

/// Addresses the HTTP client may connect to: exactly the ones checked.
struct Pinned(Vec<SocketAddr>);

impl ureq::Resolver for Pinned {
    fn resolve(&self, _netloc: &str) -> std::io::Result<Vec<SocketAddr>> {
        Ok(self.0.clone())
    }
}

/// Resolves a URL's host and checks every address; returns the addresses to connect to.
fn checked_addresses(policy: &MediaPolicy, url: &url::Url, param: &str) -> Result<Vec<SocketAddr>, ApiError> {
    let port = url.port_or_known_default().ok_or_else(|| refuse(param, "the URL has no port"))?;
    let host = url.host().ok_or_else(|| refuse(param, "the URL has no host"))?;
    let name = match &host {
        url::Host::Domain(d) => d.to_ascii_lowercase(),
        url::Host::Ipv4(ip) => ip.to_string(),
        url::Host::Ipv6(ip) => ip.to_string(),
    };
    let allowed = policy.allowed_domains.iter().any(|d| d.eq_ignore_ascii_case(&name));
    if !policy.allowed_domains.is_empty() && !allowed {
        return Err(refuse(param, format!("`{name}` is not in --allowed-media-domains")));
    }
    let addrs: Vec<SocketAddr> = match host {
        url::Host::Ipv4(ip) => vec![SocketAddr::new(IpAddr::V4(ip), port)],
        url::Host::Ipv6(ip) => vec![SocketAddr::new(IpAddr::V6(ip), port)],
        url::Host::Domain(d) => std::net::ToSocketAddrs::to_socket_addrs(&(d, port))
            .map_err(|e| refuse(param, format!("could not resolve `{name}`: {e}")))?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(refuse(param, format!("`{name}` has no address")));
    }
    if !allowed && let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
        return Err(refuse(param, format!("`{name}` resolves to {}, which is not a public address", bad.ip())));
    }
    Ok(addrs)
}

fn fetch_http(policy: &MediaPolicy, mut url: url::Url, param: &str) -> Result<Vec<u8>, ApiError> {
    let deadline = Instant::now() + policy.timeout;
    for _ in 0..=policy.max_redirects {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(refuse(param, format!("redirected to a `{}:` URL", url.scheme())));
        }
        let addrs = checked_addresses(policy, &url, param)?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(refuse(param, "fetching the image took too long"));
        }
        let agent = ureq::AgentBuilder::new().resolver(Pinned(addrs)).redirects(0).timeout(left).build();
        let resp = match agent.get(url.as_str()).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) if (300..400).contains(&code) => r,
            Err(ureq::Error::Status(code, _)) => return Err(refuse(param, format!("fetching the image returned HTTP {code}"))),
            Err(e) => return Err(refuse(param, format!("fetching the image failed: {}", e.kind()))),
        };
        if (300..400).contains(&resp.status()) {
            let to = resp.header("location").ok_or_else(|| refuse(param, "a redirect without a Location"))?;
            url = url.join(to).map_err(|e| refuse(param, format!("bad redirect: {e}")))?;
            continue;
        }
        if let Some(len) = resp.header("content-length").and_then(|l| l.parse::<usize>().ok())
            && len > policy.max_bytes
        {
            return Err(refuse(param, format!("the image is larger than {} bytes", policy.max_bytes)));
        }
        let mut body = Vec::new();
        let read = resp.into_reader().take(policy.max_bytes as u64 + 1).read_to_end(&mut body);
        if let Err(e) = read {
            let msg = if Instant::now() >= deadline {
                "fetching the image took too long".to_string()
            } else {
                format!("reading the image failed: {e}")
            };
            return Err(refuse(param, msg));
        }
        if body.len() > policy.max_bytes {
            return Err(refuse(param, format!("the image is larger than {} bytes", policy.max_bytes)));
        }
        return Ok(body);
    }
    Err(refuse(param, format!("more than {} redirects", policy.max_redirects)))
}

/// The longest side accepted (a 1 x 67M-pixel strip would otherwise pass the pixel cap).
pub const MAX_SIDE: u32 = 16384;

/// Decodes an image (PNG, JPEG, WebP, GIF's first frame) to RGB, refusing it from its header alone when
/// it is larger than `max_pixels`. An image with transparency is composited over white, as
/// transformers' `convert_to_rgb` does it (Pillow's integer `alpha_composite`).
pub fn decode(bytes: &[u8], max_pixels: u64, param: &str) -> Result<RgbImage, ApiError> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| refuse(param, format!("unreadable image: {e}")))?;
    let format = reader.format();
    if format.is_none() {
        return Err(refuse(param, "unsupported image format (use PNG, JPEG, WebP or GIF)"));
    }
    let (w, h) = reader.into_dimensions().map_err(|e| refuse(param, format!("unreadable image: {e}")))?;
    if w == 0 || h == 0 {
        return Err(refuse(param, "the image is empty"));
    }
    if w.max(h) > MAX_SIDE || w as u64 * h as u64 > max_pixels {
        return Err(refuse(param, format!("the image is {w}x{h}; at most {max_pixels} pixels are accepted")));
    }
    if format == Some(image::ImageFormat::Jpeg)
        && let Some(decoded) = crate::jpeg::decode_rgb(bytes)
    {
        let (w, h, rgb) = decoded.map_err(|e| refuse(param, format!("could not decode the image: {e}")))?;
        return RgbImage::from_raw(w, h, rgb).ok_or_else(|| refuse(param, "could not decode the image"));
    }
    let mut reader =
        image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| refuse(param, e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(max_pixels * 16 + (64 << 20));
    reader.limits(limits);
    let img = reader.decode().map_err(|e| refuse(param, format!("could not decode the image: {e}")))?;
    if !img.color().has_alpha() {
        return Ok(img.to_rgb8());
    }
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        o.0 = over_white(p.0);
    }
    Ok(out)
}

/// Pillow's `alpha_composite` of one pixel over opaque white (AlphaComposite.c, 7 bits of precision).
fn over_white([r, g, b, a]: [u8; 4]) -> [u8; 3] {
    if a == 0 {
        return [255; 3];
    }
    const P: u32 = 7;
    let a = a as u32;
    let outa255 = a * 255 + 255 * (255 - a);
    let coef1 = a * 255 * 255 * (1 << P) / outa255;
    let coef2 = 255 * (1 << P) - coef1;
    let mix = |c: u8| {
        let t = c as u32 * coef1 + 255 * coef2 + (0x80 << P);
        ((((t >> 8) + t) >> 8) >> P) as u8
    };
    [mix(r), mix(g), mix(b)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_embedded_private_addresses_are_refused() {
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ] {
            assert!(!is_public(bad.parse().unwrap()), "{bad} passed");
        }
        for good in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(good.parse().unwrap()), "{good} refused");
        }
    }

    #[test]
    fn every_spelling_of_an_address_is_normalised_before_the_check() {
        let p = MediaPolicy::default();
        for url in [
            "http://2130706433/x.png",
            "http://0x7f000001/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://[::ffff:7f00:1]/",
            "http://169.254.169.254/latest",
        ] {
            let u = url::Url::parse(url).unwrap();
            let err = checked_addresses(&p, &u, "image_url").unwrap_err();
            assert!(err.message.contains("not a public address"), "{url}: {}", err.message);
        }
    }
}
