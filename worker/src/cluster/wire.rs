//! Activation frames on the wire: raw little-endian rows in the compute dtype, checked against the
//! model shape before use.

use switchyard_kernels::DType;
use switchyard_kernels::dtype::f32_to_bf16_bits;
use switchyard_proto::v1;

/// The model shape a frame is checked against.
#[derive(Clone, Copy, Debug)]
pub struct FrameShape {
    pub num_layers: usize,
    pub num_experts: usize,
    pub hidden: usize,
    pub dtype: DType,
    /// Most pairs one frame may carry (bounds memory per frame).
    pub max_pairs: usize,
}

pub fn to_wire(dt: DType) -> v1::DType {
    match dt {
        DType::F32 => v1::DType::DtypeF32,
        DType::BF16 => v1::DType::DtypeBf16,
        DType::F16 => v1::DType::DtypeF16,
    }
}

pub fn from_wire(dt: i32) -> Option<DType> {
    match v1::DType::try_from(dt).ok()? {
        v1::DType::DtypeF32 => Some(DType::F32),
        v1::DType::DtypeBf16 => Some(DType::BF16),
        v1::DType::DtypeF16 => Some(DType::F16),
        v1::DType::DtypeUnspecified => None,
    }
}

/// Encodes values that are already exact in `dt` (rounded) as little-endian `dt` bytes.
pub fn encode(dt: DType, xs: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * dt.size());
    match dt {
        DType::F32 => xs.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        DType::BF16 => xs.iter().for_each(|x| out.extend_from_slice(&f32_to_bf16_bits(*x).to_le_bytes())),
        DType::F16 => xs.iter().for_each(|x| out.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes())),
    }
    out
}

pub fn decode(dt: DType, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / dt.size()];
    dt.decode_into(bytes, &mut out);
    out
}

/// A checked [`v1::LayerRequest`]: rows decoded, pairs in range.
#[derive(Debug)]
pub struct LayerFrame {
    pub layer: usize,
    pub plan_version: u64,
    pub rows: Vec<f32>,
    pub pair_row: Vec<usize>,
    pub pair_expert: Vec<u32>,
    pub pair_weight: Vec<f32>,
}

/// Checks every length, index and id in a request against the model shape; never panics.
pub fn check_request(req: &v1::LayerRequest, s: &FrameShape) -> Result<LayerFrame, String> {
    let layer = req.layer as usize;
    if layer >= s.num_layers {
        return Err(format!("layer {layer} out of range ({} layers)", s.num_layers));
    }
    if req.hidden as usize != s.hidden {
        return Err(format!("hidden size {} does not match the model's {}", req.hidden, s.hidden));
    }
    match from_wire(req.dtype) {
        Some(dt) if dt == s.dtype => {}
        _ => return Err(format!("dtype {} does not match the model's {}", req.dtype, s.dtype.name())),
    }
    let row_bytes = s.hidden * s.dtype.size();
    if !req.rows.len().is_multiple_of(row_bytes) {
        return Err(format!("rows are {} bytes, not a multiple of one row ({row_bytes})", req.rows.len()));
    }
    let n_rows = req.rows.len() / row_bytes;
    let n = req.pair_row.len();
    if req.pair_expert.len() != n || req.pair_weight.len() != n {
        return Err(format!(
            "pair lists differ in length: {} rows, {} experts, {} weights",
            n,
            req.pair_expert.len(),
            req.pair_weight.len()
        ));
    }
    if n > s.max_pairs {
        return Err(format!("{n} pairs in one frame, more than {}", s.max_pairs));
    }
    if let Some(&r) = req.pair_row.iter().find(|&&r| r as usize >= n_rows) {
        return Err(format!("pair row {r} out of range ({n_rows} rows)"));
    }
    if let Some(&e) = req.pair_expert.iter().find(|&&e| e as usize >= s.num_experts) {
        return Err(format!("expert id {e} out of range ({} experts)", s.num_experts));
    }
    if req.pair_weight.iter().any(|w| !w.is_finite()) {
        return Err("a routing weight is not finite".into());
    }
    Ok(LayerFrame {
        layer,
        plan_version: req.plan_version,
        rows: decode(s.dtype, &req.rows),
        pair_row: req.pair_row.iter().map(|&r| r as usize).collect(),
        pair_expert: req.pair_expert.clone(),
        pair_weight: req.pair_weight.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: FrameShape = FrameShape { num_layers: 2, num_experts: 4, hidden: 3, dtype: DType::BF16, max_pairs: 64 };

    fn good() -> v1::LayerRequest {
        v1::LayerRequest {
            id: 1,
            plan_version: 1,
            layer: 1,
            dtype: v1::DType::DtypeBf16 as i32,
            hidden: 3,
            rows: encode(DType::BF16, &[1.0, -2.0, 0.5, 3.0, 0.0, 1.5]),
            pair_row: vec![0, 1],
            pair_expert: vec![3, 0],
            pair_weight: vec![0.5, 0.25],
            traceparent: String::new(),
        }
    }

    #[test]
    fn a_good_frame_decodes_exactly() {
        let f = check_request(&good(), &SHAPE).unwrap();
        assert_eq!(f.rows, [1.0, -2.0, 0.5, 3.0, 0.0, 1.5]);
        assert_eq!(f.pair_row, [0, 1]);
    }

    #[test]
    fn malformed_frames_are_refused_with_a_reason() {
        type Break = Box<dyn Fn(&mut v1::LayerRequest)>;
        let cases: Vec<(&str, Break)> = vec![
            ("layer", Box::new(|r| r.layer = 2)),
            ("hidden", Box::new(|r| r.hidden = 4)),
            ("dtype", Box::new(|r| r.dtype = v1::DType::DtypeF32 as i32)),
            ("dtype", Box::new(|r| r.dtype = 99)),
            ("multiple", Box::new(|r| r.rows.pop().map(|_| ()).unwrap_or(()))),
            ("differ", Box::new(|r| r.pair_weight.pop().map(|_| ()).unwrap_or(()))),
            ("pair row", Box::new(|r| r.pair_row[0] = 2)),
            ("expert id", Box::new(|r| r.pair_expert[1] = 4)),
            ("finite", Box::new(|r| r.pair_weight[0] = f32::NAN)),
            (
                "more than",
                Box::new(|r| {
                    r.pair_row = vec![0; 65];
                    r.pair_expert = vec![0; 65];
                    r.pair_weight = vec![0.0; 65];
                }),
            ),
        ];
        for (want, mutate) in cases {
            let mut r = good();
            mutate(&mut r);
            let e = check_request(&r, &SHAPE).unwrap_err();
            assert!(e.contains(want), "expected `{want}` in `{e}`");
        }
    }
}
