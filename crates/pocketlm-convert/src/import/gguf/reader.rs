//! The bounds-checked cursor the GGUF header, metadata and tensor table are parsed with.

use super::*;

/// Bounds-checked little-endian cursor; errors describe what was being read and where.
pub(super) struct Reader<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                needed: n,
                at: self.pos,
                file_len: self.buf.len(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(super) fn u32(&mut self) -> Result<u32, GgufError> {
        self.array().map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self) -> Result<u64, GgufError> {
        self.array().map(u64::from_le_bytes)
    }

    /// A u64 count of items each at least `min_size` bytes, checked against what is left.
    pub(super) fn count(
        &mut self,
        min_size: usize,
        what: &'static str,
    ) -> Result<usize, GgufError> {
        let at = self.pos;
        let n = self.u64()?;
        let room = (self.remaining() / min_size.max(1)) as u64;
        if n > room {
            return Err(GgufError::CountTooLarge {
                what,
                count: n,
                at,
                left: self.remaining(),
            });
        }
        Ok(n as usize)
    }

    pub(super) fn string(&mut self, max_len: u64) -> Result<String, GgufError> {
        let at = self.pos;
        let len = self.u64()?;
        if len > max_len {
            return Err(GgufError::StringOverLimit {
                len,
                at,
                limit: max_len,
            });
        }
        if len > self.remaining() as u64 {
            return Err(GgufError::StringPastEnd {
                len,
                at,
                left: self.remaining(),
            });
        }
        let bytes = self.take(len as usize)?;
        // Invalid UTF-8 is not a safety problem; keep going with replacement characters.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    pub(super) fn typed_value(&mut self) -> Result<GgufValue, GgufError> {
        let ty = self.u32()?;
        self.value(ty)
    }

    pub(super) fn value(&mut self, ty: u32) -> Result<GgufValue, GgufError> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>()?[0]),
            1 => GgufValue::I8(self.array::<1>()?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => GgufValue::Bool(self.bool()?),
            8 => GgufValue::String(self.string(u64::MAX)?),
            9 => GgufValue::Array(self.array_value(1)?),
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(GgufError::UnknownValueType {
                    type_id: other,
                    at: self.pos - 4,
                });
            }
        })
    }

    pub(super) fn bool(&mut self) -> Result<bool, GgufError> {
        let at = self.pos;
        match self.array::<1>()?[0] {
            0 => Ok(false),
            1 => Ok(true),
            byte => Err(GgufError::InvalidBool { byte, at }),
        }
    }

    pub(super) fn array_value(&mut self, depth: usize) -> Result<GgufArray, GgufError> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(GgufError::ArrayTooDeep { at: self.pos });
        }
        let ty = self.u32()?;
        macro_rules! items {
            ($variant:ident, $size:expr, $read:expr) => {{
                let n = self.count($size, "array")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push($read(&mut *self)?);
                }
                GgufArray::$variant(v)
            }};
        }
        Ok(match ty {
            0 => items!(U8, 1, |r: &mut Self| r.array::<1>().map(|b| b[0])),
            1 => items!(I8, 1, |r: &mut Self| r.array::<1>().map(|b| b[0] as i8)),
            2 => items!(U16, 2, |r: &mut Self| r.array().map(u16::from_le_bytes)),
            3 => items!(I16, 2, |r: &mut Self| r.array().map(i16::from_le_bytes)),
            4 => items!(U32, 4, |r: &mut Self| r.u32()),
            5 => items!(I32, 4, |r: &mut Self| r.array().map(i32::from_le_bytes)),
            6 => items!(F32, 4, |r: &mut Self| r.array().map(f32::from_le_bytes)),
            7 => items!(Bool, 1, |r: &mut Self| r.bool()),
            8 => items!(String, 8, |r: &mut Self| r.string(u64::MAX)),
            9 => items!(Array, 12, |r: &mut Self| r.array_value(depth + 1)),
            10 => items!(U64, 8, |r: &mut Self| r.u64()),
            11 => items!(I64, 8, |r: &mut Self| r.array().map(i64::from_le_bytes)),
            12 => items!(F64, 8, |r: &mut Self| r.array().map(f64::from_le_bytes)),
            other => {
                return Err(GgufError::UnknownArrayType {
                    type_id: other,
                    at: self.pos - 4,
                });
            }
        })
    }

    /// The rest of a tensor descriptor, after its `name`.
    pub(super) fn tensor_info(&mut self, name: &str) -> Result<GgufTensorInfo, GgufError> {
        let n_dims = self.u32()?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(GgufError::Rank { n_dims });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut n_elements: usize = 1;
        for _ in 0..n_dims {
            let d = self.u64()?;
            // ggml stores dims as int64; anything that does not fit usize cannot be mapped.
            let du = usize::try_from(d)
                .ok()
                .filter(|_| d <= i64::MAX as u64)
                .ok_or(GgufError::DimensionTooLarge { dim: d })?;
            n_elements = n_elements
                .checked_mul(du)
                .ok_or(GgufError::ElementCountOverflow)?;
            dims.push(d);
        }
        let type_id = self.u32()?;
        let ggml_type = GgmlType::from_id(type_id);
        let offset = self.u64()?;
        if ggml_type.geometry().is_none() {
            return Err(GgufError::UnknownGgmlType { type_id });
        }
        let row = ggml_type.row_bytes(dims[0] as usize)?;
        let rows = if dims[0] == 0 {
            0
        } else {
            n_elements / dims[0] as usize
        };
        let n_bytes = row.checked_mul(rows).ok_or(GgufError::ByteSizeOverflow)?;
        Ok(GgufTensorInfo {
            name: name.to_string(),
            dims,
            ggml_type,
            offset,
            n_elements,
            n_bytes,
        })
    }
}
