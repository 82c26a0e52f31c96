//! A strict parser of the Prometheus/OpenMetrics text format, for the `/metrics` tests: every
//! line is a `# HELP`, `# TYPE`, `# UNIT`, the final `# EOF`, or a sample of a declared
//! family; label values are quoted with `\\`, `\"`, `\n` escapes; values are floats; a
//! histogram's buckets are cumulative and its `+Inf` bucket equals its `_count`.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};

/// One sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Sample name (`fastmig_migrations_total`, `..._bucket`).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name → type.
    pub types: HashMap<String, String>,
    /// Samples in order.
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Samples named `name` whose labels include every `(k, v)` of `with`.
    pub fn find(&self, name: &str, with: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && with
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The one sample named `name` with these labels.
    pub fn value(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        let found = self.find(name, with);
        assert_eq!(found.len(), 1, "{name} {with:?}: {found:?}");
        found[0].value
    }

    /// Sum of the samples named `name` with these labels (0 when none).
    pub fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.find(name, with).iter().map(|s| s.value).sum()
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !valid_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut chars = rest[eq + 1..].char_indices();
        if chars.next().map(|c| c.1) != Some('"') {
            return Err("label value not quoted".into());
        }
        let mut value = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next().map(|c| c.1) {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                '"' => {
                    end = Some(eq + 1 + i + 1);
                    break;
                }
                '\n' => return Err("newline in label value".into()),
                c => value.push(c),
            }
        }
        let end = end.ok_or("unterminated label value")?;
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_total", "_bucket", "_sum", "_count", "_created"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.contains_key(base) {
                return Some(base);
            }
        }
    }
    None
}

/// Parses `text`; any deviation is an error naming the line.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut e = Exposition::default();
    let mut eof = false;
    for (n, line) in text.lines().enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if eof {
            return Err(err("content after # EOF".into()));
        }
        if let Some(c) = line.strip_prefix("# ") {
            let mut parts = c.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("EOF"), None, None) => eof = true,
                (Some("HELP"), Some(name), _) | (Some("UNIT"), Some(name), _)
                    if valid_name(name) => {}
                (Some("TYPE"), Some(name), Some(t)) if valid_name(name) => {
                    let known = [
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "info",
                        "stateset",
                        "unknown",
                    ];
                    if !known.contains(&t) {
                        return Err(err(format!("unknown type {t}")));
                    }
                    if e.types.insert(name.to_owned(), t.to_owned()).is_some() {
                        return Err(err("family declared twice".into()));
                    }
                }
                _ => return Err(err("bad comment".into())),
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(err("bad metric name".into()));
        }
        if family_of(name, &e.types).is_none() {
            return Err(err("sample of an undeclared family".into()));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end + 1..]).map_err(&err)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("no space before value".into()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(&err)?;
        // An optional timestamp; nothing more.
        if let Some(ts) = fields.next() {
            parse_value(ts).map_err(&err)?;
        }
        if fields.next().is_some() {
            return Err(err("trailing fields".into()));
        }
        e.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    if !eof {
        return Err("no # EOF".into());
    }
    check_histograms(&e)?;
    Ok(e)
}

fn check_histograms(e: &Exposition) -> Result<(), String> {
    for (fam, t) in &e.types {
        if t != "histogram" {
            continue;
        }
        // Group buckets by their labels without `le`.
        let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        for s in e
            .samples
            .iter()
            .filter(|s| s.name == format!("{fam}_bucket"))
        {
            let mut l = s.labels.clone();
            let le = l
                .remove("le")
                .ok_or_else(|| format!("{fam}: bucket without le"))?;
            series
                .entry(l)
                .or_default()
                .push((parse_value(&le)?, s.value));
        }
        for (labels, buckets) in series {
            let mut prev = (f64::NEG_INFINITY, 0.0);
            for &(le, v) in &buckets {
                if le <= prev.0 || v < prev.1 {
                    return Err(format!("{fam} {labels:?}: buckets not cumulative"));
                }
                prev = (le, v);
            }
            if prev.0 != f64::INFINITY {
                return Err(format!("{fam} {labels:?}: no +Inf bucket"));
            }
            let with: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let count = e.value(&format!("{fam}_count"), &with);
            if count != prev.1 {
                return Err(format!(
                    "{fam} {labels:?}: +Inf bucket {} != count {count}",
                    prev.1
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn the_parser_refuses_what_is_not_the_format() {
    let good = "# TYPE a counter\na_total{x=\"1\\\"2\"} 3\n# EOF\n";
    let e = parse(good).expect("good");
    assert_eq!(e.value("a_total", &[("x", "1\"2")]), 3.0);
    for bad in [
        "a_total 3\n# EOF\n",                        // undeclared
        "# TYPE a counter\na_total{x=1} 3\n# EOF\n", // unquoted
        "# TYPE a counter\na_total 3\n",             // no EOF
        "# TYPE a counter\na_total three\n# EOF\n",  // value
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n# EOF\n",
    ] {
        assert!(parse(bad).is_err(), "{bad:?} accepted");
    }
}
