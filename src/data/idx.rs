//! The IDX format of MNIST and Fashion-MNIST: a big-endian header (magic with
//! the element type and rank, then each dimension), then unsigned bytes.

use super::DataError;
use std::path::Path;

/// An IDX array of unsigned bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// Size of each dimension, e.g. `[60000, 28, 28]` for MNIST's training images.
    pub dims: Vec<usize>,
    /// The elements, row-major: the product of `dims` bytes.
    pub data: Vec<u8>,
}

/// Parses IDX bytes (element type 0x08, unsigned byte).
pub fn parse(bytes: &[u8]) -> Result<IdxArray, String> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err("not an IDX file (bad magic)".into());
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "element type 0x{:02x} is not unsigned byte",
            bytes[2]
        ));
    }
    let rank = bytes[3] as usize;
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err("truncated header".into());
    }
    let dims: Vec<usize> = (0..rank)
        .map(|d| {
            let b = &bytes[4 + 4 * d..8 + 4 * d];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    // Checked: a corrupt header's dims could overflow the product.
    let len = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("dims {dims:?} are too large"))?;
    if bytes.len() - header != len {
        return Err(format!(
            "{} data bytes for dims {dims:?}, expected {len}",
            bytes.len() - header
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Serialises an array to IDX bytes.
pub fn to_bytes(array: &IdxArray) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, array.dims.len() as u8];
    for &d in &array.dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(&array.data);
    out
}

/// Reads an IDX file, `.gz`-compressed or not.
pub fn read(path: &Path, fetch: &'static str) -> Result<IdxArray, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&raw[..]), &mut out).map_err(
            |e| DataError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("bad gzip stream: {e}"),
                fetch,
            },
        )?;
        out
    } else {
        raw
    };
    parse(&bytes).map_err(|reason| DataError::Corrupt {
        path: path.to_path_buf(),
        reason,
        fetch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_input() {
        let a = IdxArray {
            dims: vec![2, 3],
            data: vec![1, 2, 3, 4, 5, 6],
        };
        let bytes = to_bytes(&a);
        assert_eq!(&bytes[..4], &[0, 0, 8, 2]);
        assert_eq!(parse(&bytes).unwrap(), a);
        assert!(parse(&bytes[..bytes.len() - 1])
            .unwrap_err()
            .contains("expected 6"));
        assert!(parse(&[1, 2, 3]).is_err());
    }
}
