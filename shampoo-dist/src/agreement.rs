//! Checking that every rank holds the same value (a configuration, a
//! fingerprint), and gathering a JSON value from every rank.
//!
//! Each rank serialises its value to JSON; two all-gathers (the lengths,
//! then the padded texts) give every rank every other rank's value, so a
//! difference is the same error on every rank, naming the ranks and the
//! fields that differ.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::comm::Communicator;
use crate::{Error, Result};

/// Every rank's `value`, in rank order (collective). `None` for a rank
/// whose text does not parse as a `T` (a rank of another version).
pub fn all_gather_json<T: Serialize + DeserializeOwned>(
    comm: &dyn Communicator,
    value: &T,
) -> Result<Vec<Option<T>>> {
    let world = comm.world_size();
    let mine = serde_json::to_vec(value).map_err(|e| Error::Invalid(format!("to JSON: {e}")))?;
    let mut lens = vec![0u8; 8 * world];
    comm.all_gather_bytes(&(mine.len() as u64).to_le_bytes(), &mut lens)?;
    let lens: Vec<usize> = lens
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize)
        .collect();
    let max = lens.iter().copied().max().unwrap_or(0);
    let mut send = mine;
    send.resize(max, 0);
    let mut all = vec![0u8; max * world];
    comm.all_gather_bytes(&send, &mut all)?;
    Ok(all
        .chunks(max.max(1))
        .zip(&lens)
        .map(|(c, &n)| serde_json::from_slice(&c[..n]).ok())
        .collect())
}

/// Collective: checks that every rank passed the same `value`. A
/// difference is [`Error::Disagreement`] on every rank, naming `what`,
/// the ranks and (for JSON objects) the fields that differ with both
/// values, e.g. `rank 1 differs from rank 0 in seed (0 on rank 0, 3 on
/// rank 1)`.
pub fn check_agreement<T: Serialize>(comm: &dyn Communicator, what: &str, value: &T) -> Result<()> {
    let value = serde_json::to_value(value).map_err(|e| Error::Invalid(format!("{what}: {e}")))?;
    let detail = disagreement(&all_gather_json(comm, &value)?, |a, b, r| {
        describe_difference(a, b, r)
    });
    match detail {
        None => Ok(()),
        Some(detail) => Err(Error::Disagreement {
            what: what.into(),
            detail,
        }),
    }
}

/// The ranks whose value differs from rank 0's, described by `diff`
/// (`None`: every rank agrees).
pub(crate) fn disagreement<T: PartialEq>(
    values: &[Option<T>],
    diff: impl Fn(&T, &T, usize) -> String,
) -> Option<String> {
    let Some(first) = values.first()? else {
        return Some("rank 0's value is unreadable".into());
    };
    let mut problems = Vec::new();
    for (r, v) in values.iter().enumerate().skip(1) {
        match v {
            Some(b) if b == first => {}
            Some(b) => problems.push(format!(
                "rank {r} differs from rank 0: {}",
                diff(first, b, r)
            )),
            None => problems.push(format!("rank {r}'s value is unreadable")),
        }
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// The fields in which `b` (rank `r`'s) differs from `a` (rank 0's).
fn describe_difference(a: &Value, b: &Value, r: usize) -> String {
    let mut fields = Vec::new();
    collect_differences("", a, b, &mut fields);
    fields
        .iter()
        .map(|(k, x, y)| {
            let show = |v: &Option<&Value>| v.map_or("nothing".to_string(), |v| v.to_string());
            let name = if k.is_empty() { "the value" } else { k };
            format!("{name} ({} on rank 0, {} on rank {r})", show(x), show(y))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

type Difference<'a> = (String, Option<&'a Value>, Option<&'a Value>);

fn collect_differences<'a>(
    prefix: &str,
    a: &'a Value,
    b: &'a Value,
    out: &mut Vec<Difference<'a>>,
) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => collect_differences(&name, u, v, out),
                    (u, v) => out.push((name, u, v)),
                }
            }
        }
        _ if a != b => out.push((prefix.to_string(), Some(a), Some(b))),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CommOptions, in_process};
    use serde_json::json;

    fn run(values: Vec<Value>) -> Vec<Result<()>> {
        let comms = in_process(values.len(), &CommOptions::default());
        std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .zip(values)
                .map(|(c, v)| s.spawn(move || check_agreement(c.as_ref(), "the run", &v)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn equal_values_agree() {
        let v = json!({"seed": 0, "lr": 0.1});
        assert!(run(vec![v.clone(), v.clone(), v]).iter().all(|r| r.is_ok()));
    }

    #[test]
    fn a_difference_is_the_same_error_on_every_rank_naming_the_fields() {
        let a = json!({"seed": 0, "opt": {"lr": 0.1, "wd": 0.0}, "batch": 64});
        let b = json!({"seed": 3, "opt": {"lr": 0.1, "wd": 0.5}, "batch": 64});
        let results = run(vec![a.clone(), a, b]);
        for r in results {
            assert_eq!(
                r.unwrap_err().to_string(),
                "ranks disagree on the run: rank 2 differs from rank 0: opt.wd (0.0 on rank 0, 0.5 on rank 2), seed (0 on rank 0, 3 on rank 2)"
            );
        }
    }
}
