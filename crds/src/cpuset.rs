//! Host CPU sets written the way libvirt, `taskset` and the kernel's cpuset files write them:
//! `0-3,8`, `2`, `0-7,^4` (a caret excludes a CPU, as in libvirt's `cpuset` attribute).
//!
//! This is the one parser for cpusets in virtkube: the CRD schema's pattern only checks the
//! shape; [`CpuSet::from_str`] checks the meaning (ranges ascending, bounded, non-empty), and
//! [`CpuSet`]'s `Display` writes the canonical form libvirt itself prints, so a desired pinning
//! and the pinning libvirt reports compare equal when they mean the same CPUs.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The highest host CPU index virtkube accepts in a cpuset (libvirt's own limit is 16384
/// CPUs; anything above is a typo, not a machine).
pub const MAX_CPU: u32 = 16383;

/// The regular expression the CRD schema uses for cpuset strings: comma-separated CPUs or
/// ranges, each optionally negated with `^`. Meaning is checked by [`CpuSet::from_str`].
pub const CPUSET_PATTERN: &str = r"^\^?[0-9]+(-[0-9]+)?(,\^?[0-9]+(-[0-9]+)?)*$";

/// A non-empty set of host CPU indices.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CpuSet(BTreeSet<u32>);

/// Why a cpuset string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuSetError {
    /// The string was empty or only whitespace.
    #[error("cpuset is empty: write CPUs like `0-3,8`")]
    Empty,
    /// One comma-separated item was not a number, a range or a `^`-exclusion.
    #[error(
        "cpuset item `{item}` is not a CPU number, a range like `0-3`, or an exclusion like `^2`"
    )]
    BadItem {
        /// The offending item.
        item: String,
    },
    /// A range whose end is below its start (`5-2`).
    #[error("cpuset range `{item}` runs backwards: write the lower CPU first")]
    Backwards {
        /// The offending range.
        item: String,
    },
    /// A CPU index above [`MAX_CPU`].
    #[error("CPU {cpu} in cpuset is above the supported maximum {MAX_CPU}")]
    TooLarge {
        /// The offending CPU index.
        cpu: u32,
    },
    /// Exclusions removed every CPU (`0,^0`).
    #[error("cpuset `{text}` selects no CPU after exclusions")]
    NothingSelected {
        /// The whole cpuset string.
        text: String,
    },
}

impl CpuSet {
    /// Builds a set from CPU indices; `None` when `cpus` is empty or any index exceeds
    /// [`MAX_CPU`].
    pub fn from_cpus(cpus: impl IntoIterator<Item = u32>) -> Option<Self> {
        let set: BTreeSet<u32> = cpus.into_iter().collect();
        if set.is_empty() || set.iter().any(|&c| c > MAX_CPU) {
            return None;
        }
        Some(Self(set))
    }

    /// The CPU indices in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    /// Whether `cpu` is in the set.
    pub fn contains(&self, cpu: u32) -> bool {
        self.0.contains(&cpu)
    }

    /// The number of CPUs in the set (never zero).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a `CpuSet` holds at least one CPU. Present for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The highest CPU index in the set.
    pub fn max(&self) -> u32 {
        self.0.last().copied().unwrap_or_default()
    }

    /// Encodes the set as libvirt's cpumap: one bit per host CPU, CPU 0 in the lowest bit of
    /// the first byte, `host_cpus` bits rounded up to whole bytes. CPUs at or above
    /// `host_cpus` are dropped; check with [`CpuSet::max`] first when that matters.
    pub fn to_cpumap(&self, host_cpus: u32) -> Vec<u8> {
        let mut map = vec![0u8; host_cpus.div_ceil(8) as usize];
        for cpu in self.iter().filter(|&c| c < host_cpus) {
            map[(cpu / 8) as usize] |= 1 << (cpu % 8);
        }
        map
    }

    /// Decodes libvirt's cpumap (see [`CpuSet::to_cpumap`]); `None` when no bit is set.
    pub fn from_cpumap(map: &[u8]) -> Option<Self> {
        let cpus = map.iter().enumerate().flat_map(|(byte, bits)| {
            (0..8u32)
                .filter(move |bit| bits & (1 << bit) != 0)
                .map(move |bit| byte as u32 * 8 + bit)
        });
        Self::from_cpus(cpus)
    }
}

impl FromStr for CpuSet {
    type Err = CpuSetError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.is_empty() {
            return Err(CpuSetError::Empty);
        }
        let mut include = BTreeSet::new();
        let mut exclude = BTreeSet::new();
        for raw in text.split(',') {
            let item = raw.trim();
            let (target, body) = match item.strip_prefix('^') {
                Some(rest) => (&mut exclude, rest),
                None => (&mut include, item),
            };
            let (lo, hi) = parse_item(body).ok_or_else(|| CpuSetError::BadItem {
                item: item.to_string(),
            })?;
            if hi < lo {
                return Err(CpuSetError::Backwards {
                    item: item.to_string(),
                });
            }
            if hi > MAX_CPU {
                return Err(CpuSetError::TooLarge { cpu: hi });
            }
            target.extend(lo..=hi);
        }
        let selected: BTreeSet<u32> = include.difference(&exclude).copied().collect();
        if selected.is_empty() {
            return Err(CpuSetError::NothingSelected {
                text: text.to_string(),
            });
        }
        Ok(Self(selected))
    }
}

/// Parses `N` or `N-M` (no sign, no spaces inside) into an inclusive range.
fn parse_item(body: &str) -> Option<(u32, u32)> {
    let number = |s: &str| -> Option<u32> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    match body.split_once('-') {
        Some((lo, hi)) => Some((number(lo)?, number(hi)?)),
        None => number(body).map(|n| (n, n)),
    }
}

/// Writes the canonical form libvirt prints: ascending, runs of two or more joined as `a-b`.
impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut cpus = self.iter().peekable();
        while let Some(start) = cpus.next() {
            let mut end = start;
            while cpus.peek() == Some(&(end + 1)) {
                end += 1;
                cpus.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if end == start {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuSet({self})")
    }
}

impl Serialize for CpuSet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CpuSet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<CpuSet, CpuSetError> {
        s.parse()
    }

    #[test]
    fn parses_the_forms_libvirt_and_taskset_write() {
        let cases = [
            ("0", "0"),
            ("0-3", "0-3"),
            ("0-3,8", "0-3,8"),
            ("8,0-3", "0-3,8"),
            ("0,1,2,3", "0-3"),
            ("0-7,^4", "0-3,5-7"),
            ("^4,0-7", "0-3,5-7"),
            (" 1 , 3 ", "1,3"),
            ("2-2", "2"),
            ("0-1,1-2", "0-2"),
        ];
        for (input, canonical) in cases {
            assert_eq!(
                parse(input).unwrap().to_string(),
                canonical,
                "input {input:?}"
            );
        }
    }

    #[test]
    fn refuses_what_libvirt_would_refuse_with_a_reason() {
        assert_eq!(parse(""), Err(CpuSetError::Empty));
        assert_eq!(parse("  "), Err(CpuSetError::Empty));
        assert!(matches!(parse("a"), Err(CpuSetError::BadItem { .. })));
        assert!(matches!(parse("1-"), Err(CpuSetError::BadItem { .. })));
        assert!(matches!(parse("-1"), Err(CpuSetError::BadItem { .. })));
        assert!(matches!(parse("1,,2"), Err(CpuSetError::BadItem { .. })));
        assert!(matches!(parse("+1"), Err(CpuSetError::BadItem { .. })));
        assert!(matches!(parse("5-2"), Err(CpuSetError::Backwards { .. })));
        assert_eq!(parse("16384"), Err(CpuSetError::TooLarge { cpu: 16384 }));
        assert!(matches!(
            parse("99999999999"),
            Err(CpuSetError::BadItem { .. })
        ));
        assert!(matches!(
            parse("0,^0"),
            Err(CpuSetError::NothingSelected { .. })
        ));
        let message = parse("5-2").unwrap_err().to_string();
        assert!(
            message.contains("5-2") && message.contains("lower CPU first"),
            "{message}"
        );
    }

    #[test]
    fn cpumap_matches_libvirts_bit_order() {
        let set = parse("0,3,8-9").unwrap();
        assert_eq!(set.to_cpumap(16), vec![0b0000_1001, 0b0000_0011]);
        assert_eq!(
            set.to_cpumap(4),
            vec![0b0000_1001],
            "CPUs beyond the host are dropped"
        );
        assert_eq!(CpuSet::from_cpumap(&[0b0000_1001, 0b11]).unwrap(), set);
        assert_eq!(CpuSet::from_cpumap(&[0, 0]), None);
    }

    #[test]
    fn serde_uses_the_string_form_and_validates() {
        let set: CpuSet = serde_json::from_str("\"0-3,8\"").unwrap();
        assert_eq!(serde_json::to_string(&set).unwrap(), "\"0-3,8\"");
        let err = serde_json::from_str::<CpuSet>("\"3-1\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("runs backwards"), "{err}");
    }

    #[test]
    fn schema_pattern_accepts_exactly_the_shapes_the_parser_reads() {
        let pattern = regex::Regex::new(CPUSET_PATTERN).unwrap();
        for ok in ["0", "0-3,8", "0-7,^4", "^1,0-3"] {
            assert!(pattern.is_match(ok), "{ok}");
            assert!(parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a", "1-", "1,,2", " 1", "1, 2", "-1"] {
            assert!(!pattern.is_match(bad), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(cpus in proptest::collection::btree_set(0u32..512, 1..40)) {
            let set = CpuSet::from_cpus(cpus.iter().copied()).unwrap();
            let again: CpuSet = set.to_string().parse().unwrap();
            prop_assert_eq!(&again, &set);
            prop_assert_eq!(CpuSet::from_cpumap(&set.to_cpumap(512)).unwrap(), set);
        }
    }
}
