//! Decoding and validating a `.plm` file's layout before anything is handed out: the header,
//! the sections' placement, the metadata block and the tensor table (every offset, length,
//! shape and name, and that no two tensors overlap).

use std::collections::HashMap;
use std::ops::Range;

use super::TensorEntry;
use crate::{
    Encoding, FORMAT_VERSION, HEADER_SIZE, KNOWN_REQUIRED_FLAGS, MAGIC, MAX_METADATA_LEN,
    MAX_NAME_LEN, MAX_RANK, MAX_TENSORS, OLDEST_READ_VERSION, PlmError, REQUIRED_FLAGS_MASK,
    TENSOR_ALIGNMENT, header,
};

pub(super) const SECTION_HEADER: &str = "header";
pub(super) const SECTION_METADATA: &str = "metadata";
pub(super) const SECTION_TABLE: &str = "tensor table";
pub(super) const SECTION_DATA: &str = "tensor data region";

/// Header fields, decoded but not yet validated against each other.
pub(super) struct Header {
    pub(super) version: u32,
    /// The required flags (validated as known).
    pub(super) required_flags: u32,
    pub(super) file_len: u64,
    pub(super) data: Range<u64>,
    pub(super) meta: Range<u64>,
    pub(super) meta_crc: u32,
    pub(super) tensor_count: u32,
    pub(super) table: Range<u64>,
    pub(super) table_crc: u32,
}

pub(super) fn short_file_error(prefix: &[u8]) -> PlmError {
    let n = prefix.len().min(MAGIC.len());
    if prefix.is_empty() {
        PlmError::NotPlm {
            reason: "the file is empty".into(),
        }
    } else if prefix[..n] == MAGIC[..n] {
        PlmError::TruncatedHeader {
            actual: prefix.len() as u64,
        }
    } else {
        PlmError::NotPlm {
            reason: format!("bad magic {:?}", String::from_utf8_lossy(&prefix[..n])),
        }
    }
}

/// `bytes[range]` for a range already checked against the file length.
pub(super) fn slice<'a>(bytes: &'a [u8], range: &Range<u64>) -> &'a [u8] {
    &bytes[range.start as usize..range.end as usize]
}

pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes the header; `bytes` is at least `HEADER_SIZE` long.
pub(super) fn parse_header(bytes: &[u8]) -> Result<Header, PlmError> {
    let h = &bytes[..HEADER_SIZE];
    if h[header::MAGIC..header::MAGIC + 8] != MAGIC {
        return Err(PlmError::NotPlm {
            reason: format!(
                "bad magic {:?} (expected \"POCKETLM\")",
                String::from_utf8_lossy(&h[..8])
            ),
        });
    }
    // The version is read before the CRC: another major version may lay out its header
    // differently, and "unsupported version" is the useful message then.
    let version = u32_at(h, header::VERSION);
    if !(OLDEST_READ_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(PlmError::UnsupportedVersion { version });
    }
    let stored_crc = u32_at(h, header::HEADER_CRC);
    let actual_crc = crc32fast::hash(&h[..header::HEADER_CRC]);
    if stored_crc != actual_crc {
        return Err(PlmError::corrupt(
            SECTION_HEADER,
            format!("checksum mismatch (stored {stored_crc:#010x}, computed {actual_crc:#010x})"),
        ));
    }
    let flags = u32_at(h, header::FLAGS);
    let unknown = flags & REQUIRED_FLAGS_MASK & !KNOWN_REQUIRED_FLAGS;
    if unknown != 0 {
        return Err(PlmError::UnsupportedFlags { flags: unknown });
    }
    let range = |off: usize, len: usize, what: &str| {
        let start = u64_at(h, off);
        let length = u64_at(h, len);
        start
            .checked_add(length)
            .map(|end| start..end)
            .ok_or_else(|| {
                PlmError::corrupt(
                    SECTION_HEADER,
                    format!("{what} range {start}+{length} overflows"),
                )
            })
    };
    let meta_len = u64_at(h, header::META_LEN);
    if meta_len > MAX_METADATA_LEN {
        return Err(PlmError::corrupt(
            SECTION_METADATA,
            format!(
                "length {meta_len} exceeds the {} MiB limit",
                MAX_METADATA_LEN >> 20
            ),
        ));
    }
    let tensor_count = u32_at(h, header::TENSOR_COUNT);
    if tensor_count > MAX_TENSORS {
        return Err(PlmError::corrupt(
            SECTION_TABLE,
            format!("{tensor_count} tensors exceeds the limit of {MAX_TENSORS}"),
        ));
    }
    Ok(Header {
        version,
        required_flags: flags & REQUIRED_FLAGS_MASK,
        file_len: u64_at(h, header::FILE_LEN),
        data: range(header::DATA_OFFSET, header::DATA_LEN, "tensor data")?,
        meta: range(header::META_OFFSET, header::META_LEN, "metadata")?,
        meta_crc: u32_at(h, header::META_CRC),
        tensor_count,
        table: range(header::TABLE_OFFSET, header::TABLE_LEN, "tensor table")?,
        table_crc: u32_at(h, header::TABLE_CRC),
    })
}

/// Every section lies after the header, inside the file, and no two overlap.
pub(super) fn check_sections(hdr: &Header) -> Result<(), PlmError> {
    let sections: [(&'static str, &Range<u64>); 3] = [
        (SECTION_DATA, &hdr.data),
        (SECTION_METADATA, &hdr.meta),
        (SECTION_TABLE, &hdr.table),
    ];
    for (name, r) in sections {
        if r.start < HEADER_SIZE as u64 || r.end > hdr.file_len {
            return Err(PlmError::corrupt(
                name,
                format!(
                    "{name} spans bytes {}..{}, outside {HEADER_SIZE}..{} (after the header, \
                     inside the file)",
                    r.start, r.end, hdr.file_len
                ),
            ));
        }
    }
    if !hdr.data.start.is_multiple_of(TENSOR_ALIGNMENT as u64) {
        return Err(PlmError::corrupt(
            SECTION_DATA,
            format!(
                "tensor data region starts at {}, not a multiple of {TENSOR_ALIGNMENT}",
                hdr.data.start
            ),
        ));
    }
    for i in 0..sections.len() {
        for j in i + 1..sections.len() {
            let (a, ra) = sections[i];
            let (b, rb) = sections[j];
            if ra.start < rb.end && rb.start < ra.end {
                return Err(PlmError::corrupt(
                    b,
                    format!(
                        "{b} (bytes {}..{}) overlaps the {a} (bytes {}..{})",
                        rb.start, rb.end, ra.start, ra.end
                    ),
                ));
            }
        }
    }
    Ok(())
}

pub(super) fn parse_metadata(bytes: &[u8], stored_crc: u32) -> Result<serde_json::Value, PlmError> {
    let actual = crc32fast::hash(bytes);
    if actual != stored_crc {
        return Err(PlmError::corrupt(
            SECTION_METADATA,
            format!(
                "checksum mismatch (header says {stored_crc:#010x}, block hashes to {actual:#010x})"
            ),
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| PlmError::corrupt(SECTION_METADATA, format!("invalid JSON: {e}")))?;
    if !value.is_object() {
        return Err(PlmError::corrupt(
            SECTION_METADATA,
            "the metadata block is valid JSON but not an object",
        ));
    }
    Ok(value)
}

/// Bounds-checked little-endian cursor over the table bytes.
pub(super) struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    entry: u32,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], PlmError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                PlmError::corrupt(
                    SECTION_TABLE,
                    format!(
                        "entry #{} is cut off at its {what} ({n} bytes needed at table offset \
                         {}, table has {})",
                        self.entry,
                        self.pos,
                        self.bytes.len()
                    ),
                )
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, PlmError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, PlmError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, PlmError> {
        Ok(u32_at(self.take(4, what)?, 0))
    }
    fn u64(&mut self, what: &str) -> Result<u64, PlmError> {
        Ok(u64_at(self.take(8, what)?, 0))
    }
}

pub(super) fn parse_table(bytes: &[u8], hdr: &Header) -> Result<Vec<TensorEntry>, PlmError> {
    let actual = crc32fast::hash(bytes);
    if actual != hdr.table_crc {
        return Err(PlmError::corrupt(
            SECTION_TABLE,
            format!(
                "checksum mismatch (header says {:#010x}, table hashes to {actual:#010x})",
                hdr.table_crc
            ),
        ));
    }
    // The smallest entry is 37 bytes, so a count the table cannot hold is rejected before
    // allocating for it.
    const MIN_ENTRY_LEN: u64 = 2 + 1 + 2 + 4 + 4 + 8 + 8 + 4;
    if u64::from(hdr.tensor_count) * MIN_ENTRY_LEN > bytes.len() as u64 {
        return Err(PlmError::corrupt(
            SECTION_TABLE,
            format!(
                "header says {} tensors, but the {}-byte table cannot hold that many",
                hdr.tensor_count,
                bytes.len()
            ),
        ));
    }
    let mut cur = Cursor {
        bytes,
        pos: 0,
        entry: 0,
    };
    let mut entries = Vec::with_capacity(hdr.tensor_count as usize);
    let mut seen: HashMap<&str, u32> = HashMap::with_capacity(hdr.tensor_count as usize);
    for i in 0..hdr.tensor_count {
        cur.entry = i;
        let name_len = cur.u16("name length")? as usize;
        if name_len == 0 || name_len > MAX_NAME_LEN {
            return Err(PlmError::corrupt(
                SECTION_TABLE,
                format!("entry #{i}: name length {name_len} is outside 1..={MAX_NAME_LEN}"),
            ));
        }
        let name_bytes = cur.take(name_len, "name")?;
        let name = std::str::from_utf8(name_bytes).map_err(|e| {
            PlmError::corrupt(
                SECTION_TABLE,
                format!("entry #{i}: name is not valid UTF-8 ({e})"),
            )
        })?;
        if let Some(first) = seen.insert(name, i) {
            return Err(PlmError::tensor(
                name,
                format!("duplicate tensor name (table entries #{first} and #{i})"),
            ));
        }
        let rank = cur.u8("rank")? as usize;
        if rank > MAX_RANK {
            return Err(PlmError::tensor(
                name,
                format!("rank {rank} exceeds the maximum of {MAX_RANK}"),
            ));
        }
        let mut dims = [0u64; MAX_RANK];
        for d in dims.iter_mut().take(rank) {
            *d = cur.u64("dims")?;
        }
        let dims = &dims[..rank];
        let code = cur.u16("encoding code")?;
        let param0 = cur.u32("encoding params")?;
        let param1 = cur.u32("encoding params")?;
        let offset = cur.u64("data offset")?;
        let length = cur.u64("data length")?;
        let checksum = cur.u32("checksum")?;

        let encoding = Encoding::from_table(code, param0, param1)
            .map_err(|e| PlmError::tensor(name, e.to_string()))?
            .ok_or_else(|| PlmError::UnsupportedEncoding {
                name: name.to_string(),
                code,
            })?;
        if hdr.version < 2 && encoding.is_quantized() {
            return Err(PlmError::tensor(
                name,
                format!(
                    "a format version {} file stores {encoding} matrices row by row; this build \
                     reads them in tiles of 8 rows (version {FORMAT_VERSION}): convert the model \
                     again with this version of pocketlm",
                    hdr.version
                ),
            ));
        }
        let shape: Vec<usize> = dims
            .iter()
            .map(|&d| usize::try_from(d).ok())
            .collect::<Option<_>>()
            .ok_or_else(|| {
                PlmError::tensor(
                    name,
                    format!("shape {dims:?} does not fit this platform's address space"),
                )
            })?;
        let expected = encoding.byte_len(&shape).ok_or_else(|| {
            PlmError::tensor(
                name,
                format!(
                    "shape {dims:?} does not fit encoding {encoding} (size overflows, or a \
                     quantized matrix whose row length is not a multiple of its group)"
                ),
            )
        })?;
        if expected as u64 != length {
            return Err(PlmError::tensor(
                name,
                format!(
                    "data length {length} does not match shape {dims:?} in {encoding} \
                     ({expected} bytes)"
                ),
            ));
        }
        if !offset.is_multiple_of(TENSOR_ALIGNMENT as u64) {
            return Err(PlmError::tensor(
                name,
                format!("data offset {offset} is not a multiple of {TENSOR_ALIGNMENT}"),
            ));
        }
        let in_region = offset
            .checked_add(length)
            .is_some_and(|end| offset >= hdr.data.start && end <= hdr.data.end);
        if !in_region {
            return Err(PlmError::tensor(
                name,
                format!(
                    "data bytes {offset}+{length} lie outside the tensor data region {}..{}",
                    hdr.data.start, hdr.data.end
                ),
            ));
        }
        entries.push(TensorEntry {
            name: name.to_string(),
            shape,
            encoding,
            offset,
            length,
            checksum,
        });
    }
    if cur.pos != bytes.len() {
        return Err(PlmError::corrupt(
            SECTION_TABLE,
            format!(
                "{} bytes left over after {} entries",
                bytes.len() - cur.pos,
                hdr.tensor_count
            ),
        ));
    }
    check_overlaps(&entries)?;
    Ok(entries)
}

/// No two tensors share a byte (empty tensors occupy none).
pub(super) fn check_overlaps(entries: &[TensorEntry]) -> Result<(), PlmError> {
    let mut order: Vec<&TensorEntry> = entries.iter().filter(|e| e.length > 0).collect();
    order.sort_by_key(|e| e.offset);
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.offset + a.length > b.offset {
            return Err(PlmError::tensor(
                &b.name,
                format!(
                    "data bytes {}..{} overlap tensor '{}' (bytes {}..{})",
                    b.offset,
                    b.offset + b.length,
                    a.name,
                    a.offset,
                    a.offset + a.length
                ),
            ));
        }
    }
    Ok(())
}
