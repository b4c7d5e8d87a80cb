//! libvirt's typed parameters (`virTypedParameter`) read into owned Rust values.
//!
//! `virt` 0.5 parses typed parameters with a fixed type per field and panics when libvirt
//! reports another type (drivers differ); these readers never panic: each value keeps the
//! type libvirt gave it, and callers convert with [`ParamValue::as_u64`] and friends.

use std::ffi::CStr;

use virt::sys;

/// One typed parameter's value, in the type libvirt reported.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// `VIR_TYPED_PARAM_INT`.
    Int(i32),
    /// `VIR_TYPED_PARAM_UINT`.
    UInt(u32),
    /// `VIR_TYPED_PARAM_LLONG`.
    LLong(i64),
    /// `VIR_TYPED_PARAM_ULLONG`.
    ULLong(u64),
    /// `VIR_TYPED_PARAM_DOUBLE`.
    Double(f64),
    /// `VIR_TYPED_PARAM_BOOLEAN`.
    Bool(bool),
    /// `VIR_TYPED_PARAM_STRING`.
    String(String),
}

impl ParamValue {
    /// The value as an unsigned integer (negative or non-numeric values: `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            ParamValue::Int(v) => u64::try_from(v).ok(),
            ParamValue::UInt(v) => Some(u64::from(v)),
            ParamValue::LLong(v) => u64::try_from(v).ok(),
            ParamValue::ULLong(v) => Some(v),
            ParamValue::Bool(b) => Some(u64::from(b)),
            ParamValue::Double(_) | ParamValue::String(_) => None,
        }
    }

    /// The value as a signed integer (unsigned values above `i64::MAX`: `None`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            ParamValue::Int(v) => Some(i64::from(v)),
            ParamValue::UInt(v) => Some(i64::from(v)),
            ParamValue::LLong(v) => Some(v),
            ParamValue::ULLong(v) => i64::try_from(v).ok(),
            ParamValue::Bool(b) => Some(i64::from(b)),
            ParamValue::Double(_) | ParamValue::String(_) => None,
        }
    }

    /// The value as a string, when it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            ParamValue::String(s) => Some(s),
            _ => None,
        }
    }
}

/// Named typed parameters, in libvirt's order.
pub type Params = Vec<(String, ParamValue)>;

/// Looks a parameter up by name.
pub fn get<'a>(params: &'a [(String, ParamValue)], name: &str) -> Option<&'a ParamValue> {
    params.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

/// Copies `n` typed parameters starting at `ptr` into owned values; unknown types are
/// skipped. The caller keeps ownership of libvirt's array (and frees it as the API says).
///
/// # Safety
/// `ptr` must point to `n` initialised `virTypedParameter`s (or be null with `n == 0`).
pub(crate) unsafe fn read(ptr: *const sys::virTypedParameter, n: usize) -> Params {
    if ptr.is_null() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: the caller guarantees `n` valid parameters.
        let p = unsafe { &*ptr.add(i) };
        // SAFETY: libvirt NUL-terminates `field` within its 80 bytes.
        let name = unsafe { CStr::from_ptr(p.field.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: the union member read is the one `type_` names.
        let value = unsafe {
            match p.type_ as u32 {
                sys::VIR_TYPED_PARAM_INT => ParamValue::Int(p.value.i),
                sys::VIR_TYPED_PARAM_UINT => ParamValue::UInt(p.value.ui),
                sys::VIR_TYPED_PARAM_LLONG => ParamValue::LLong(p.value.l),
                sys::VIR_TYPED_PARAM_ULLONG => ParamValue::ULLong(p.value.ul),
                sys::VIR_TYPED_PARAM_DOUBLE => ParamValue::Double(p.value.d),
                sys::VIR_TYPED_PARAM_BOOLEAN => ParamValue::Bool(p.value.b != 0),
                sys::VIR_TYPED_PARAM_STRING if !p.value.s.is_null() => {
                    ParamValue::String(CStr::from_ptr(p.value.s).to_string_lossy().into_owned())
                }
                _ => continue,
            }
        };
        out.push((name, value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_never_wrap() {
        assert_eq!(ParamValue::Int(-1).as_u64(), None);
        assert_eq!(ParamValue::ULLong(u64::MAX).as_i64(), None);
        assert_eq!(ParamValue::UInt(7).as_u64(), Some(7));
        assert_eq!(ParamValue::LLong(-5).as_i64(), Some(-5));
        assert_eq!(ParamValue::String("x".into()).as_u64(), None);
        let params = vec![("a".to_string(), ParamValue::String("vda".into()))];
        assert_eq!(get(&params, "a").and_then(ParamValue::as_str), Some("vda"));
        assert!(get(&params, "b").is_none());
    }
}
