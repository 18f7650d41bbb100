//! Quantization pass: turns f32 weight matrices into the int8/int4 encodings. Round-to-
//! nearest for now; calibration-based methods (GPTQ, AWQ) choose better scales and reuse
//! [`crate::kernels::quant::encode_with_scales`].

use crate::format::Encoding;
use crate::kernels::quant;

/// Why a matrix cannot take a quantized encoding (the converter then keeps it in f16).
pub fn unsupported_reason(shape: &[usize], encoding: Encoding) -> Option<String> {
    let group = encoding.group()? as usize;
    match shape {
        [_, cols] if cols % group == 0 => None,
        [_, cols] => Some(format!(
            "row length {cols} is not a multiple of the group size {group}"
        )),
        _ => Some(format!("shape {shape:?} is not a matrix")),
    }
}

/// Round-to-nearest quantization into the tensor bytes of `encoding`.
pub fn quantize_rtn(values: &[f32], shape: &[usize], encoding: Encoding) -> Option<Vec<u8>> {
    let &[rows, cols] = shape else { return None };
    quant::quantize_rtn(values, rows, cols, encoding)
}
