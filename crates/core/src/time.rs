//! UTC timestamps in the form Azure's JSON uses: `2024-05-01T10:00:00.1234567Z` (7 fraction digits).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time with 100 ns resolution, as Azure's .NET services report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    /// Ticks of 100 ns since the Unix epoch.
    ticks: i64,
}

impl Timestamp {
    pub fn now() -> Self {
        Self::from_system_time(SystemTime::now())
    }

    pub fn from_system_time(t: SystemTime) -> Self {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        Self { ticks: (d.as_nanos() / 100) as i64 }
    }

    pub fn from_unix_seconds(secs: i64) -> Self {
        Self { ticks: secs * 10_000_000 }
    }

    /// Ticks of 100 ns since the Unix epoch (for storing; [`Timestamp::from_ticks`] reverses it).
    pub fn ticks(self) -> i64 {
        self.ticks
    }

    pub fn from_ticks(ticks: i64) -> Self {
        Self { ticks }
    }

    pub fn unix_seconds(self) -> i64 {
        self.ticks.div_euclid(10_000_000)
    }

    /// Formats as ISO-8601 UTC with seven fractional digits and a `Z`.
    pub fn to_azure_string(self) -> String {
        let secs = self.unix_seconds();
        let frac = self.ticks.rem_euclid(10_000_000);
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:07}Z", sod / 3600, (sod % 3600) / 60, sod % 60)
    }

    /// Reads what [`Timestamp::to_azure_string`] writes (`YYYY-MM-DDThh:mm:ss[.f{1,7}]Z`).
    pub fn parse_azure(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<i64> {
            let t = s.get(r)?;
            t.bytes().all(|c| c.is_ascii_digit()).then(|| t.parse().ok())?
        };
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 59 {
            return None;
        }
        let rest = s.get(19..)?.strip_suffix('Z')?;
        let frac = match rest.strip_prefix('.') {
            None if rest.is_empty() => 0,
            Some(f) if (1..=7).contains(&f.len()) && f.bytes().all(|c| c.is_ascii_digit()) => {
                f.parse::<i64>().ok()? * 10_i64.pow(7 - f.len() as u32)
            }
            _ => return None,
        };
        let days = days_from_civil(y, mo as u32, d as u32);
        Some(Self { ticks: ((days * 86_400 + h * 3600 + mi * 60 + sec) * 10_000_000) + frac })
    }
}

/// A proleptic Gregorian date to days since 1970-01-01; the inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_epoch_and_known_dates() {
        assert_eq!(Timestamp::from_unix_seconds(0).to_azure_string(), "1970-01-01T00:00:00.0000000Z");
        // 1700000000 = 2023-11-14T22:13:20Z
        assert_eq!(Timestamp::from_unix_seconds(1_700_000_000).to_azure_string(), "2023-11-14T22:13:20.0000000Z");
        // Leap day.
        assert_eq!(Timestamp::from_unix_seconds(951_782_400).to_azure_string(), "2000-02-29T00:00:00.0000000Z");
    }

    #[test]
    fn parses_what_it_writes() {
        for ticks in [0, 17_000_000_001_234_567, 9_517_824_000_000_000, 72_581_183_999_999_999, 123] {
            let t = Timestamp { ticks };
            assert_eq!(Timestamp::parse_azure(&t.to_azure_string()), Some(t), "{}", t.to_azure_string());
        }
        let short = Timestamp::parse_azure("2023-11-14T22:13:20.5Z").unwrap();
        assert_eq!(short.ticks(), 1_700_000_000 * 10_000_000 + 5_000_000);
        assert_eq!(Timestamp::parse_azure("2023-11-14T22:13:20Z"), Some(Timestamp::from_unix_seconds(1_700_000_000)));
        for bad in [
            "",
            "2023-11-14",
            "2023-13-14T22:13:20Z",
            "2023-11-14T22:13:20",
            "2023-11-14T22:13:20.12345678Z",
            "2023-11-14T22:13:2xZ",
            "2023-11-14 22:13:20Z",
            "+023-11-14T22:13:20Z",
            "2023-11-14T22:13:20.Z",
        ] {
            assert_eq!(Timestamp::parse_azure(bad), None, "{bad}");
        }
    }

    #[test]
    fn keeps_seven_fraction_digits() {
        let t = Timestamp { ticks: 17_000_000_001_234_567 };
        assert!(t.to_azure_string().ends_with(".1234567Z"), "{}", t.to_azure_string());
    }
}
