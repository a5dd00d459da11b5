//! Reading Slurm's environment: the job, the srun step, and host lists.
//!
//! shampoo-run expects to be started once per node by `srun
//! --ntasks-per-node=1`; it then derives the node count, node rank and master
//! address from the step's variables (see docs/launcher.md for the mapping).

use std::ffi::OsString;

/// Upper bound on the number of hosts a host list may expand to.
pub const MAX_HOSTS: u64 = 1 << 20;

/// Errors from parsing a Slurm host list such as `node[01-04,07],gpu5`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostlistError {
    /// The list is empty or contains an empty entry (`a,,b`).
    #[error("empty host name in host list {0:?}")]
    EmptyHost(String),
    /// A `[` without its `]`, or the other way round.
    #[error("unbalanced brackets in host list {0:?}")]
    Unbalanced(String),
    /// A range like `[a-3]` or `[]`.
    #[error("bad range {range:?} in host list {list:?}")]
    BadRange {
        /// The offending range.
        range: String,
        /// The whole host list.
        list: String,
    },
    /// A range whose start is after its end, like `[5-3]`.
    #[error("descending range {range:?} in host list {list:?}")]
    Descending {
        /// The offending range.
        range: String,
        /// The whole host list.
        list: String,
    },
    /// The list would expand to more than [`MAX_HOSTS`] names.
    #[error("host list {0:?} expands to more than {MAX_HOSTS} hosts")]
    TooLarge(String),
}

/// One comma-separated entry: literal text interleaved with bracket groups.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    /// Inclusive numeric ranges, each with the zero-padded width of its start.
    Ranges(Vec<(u64, u64, usize)>),
}

fn parse_ranges(body: &str, list: &str) -> Result<Vec<(u64, u64, usize)>, HostlistError> {
    let bad = || HostlistError::BadRange {
        range: body.to_owned(),
        list: list.to_owned(),
    };
    let mut out = Vec::new();
    for piece in body.split(',') {
        let piece = piece.trim();
        let (lo, hi) = piece.split_once('-').unwrap_or((piece, piece));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(lo) || !digits(hi) {
            return Err(bad());
        }
        let lo_n: u64 = lo.parse().map_err(|_| bad())?;
        let hi_n: u64 = hi.parse().map_err(|_| bad())?;
        if lo_n > hi_n {
            return Err(HostlistError::Descending {
                range: piece.to_owned(),
                list: list.to_owned(),
            });
        }
        out.push((lo_n, hi_n, lo.len()));
    }
    Ok(out)
}

/// Splits at top-level commas (commas inside brackets belong to ranges).
fn split_entries(list: &str) -> Result<Vec<&str>, HostlistError> {
    let mut entries = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            ']' if depth == 1 => depth = 0,
            '[' | ']' => return Err(HostlistError::Unbalanced(list.to_owned())),
            ',' if depth == 0 => {
                entries.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(HostlistError::Unbalanced(list.to_owned()));
    }
    entries.push(&list[start..]);
    Ok(entries)
}

fn parse_entry(entry: &str, list: &str) -> Result<Vec<Part>, HostlistError> {
    let entry = entry.trim();
    if entry.is_empty() {
        return Err(HostlistError::EmptyHost(list.to_owned()));
    }
    let mut parts = Vec::new();
    let mut rest = entry;
    while let Some(open) = rest.find('[') {
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_owned()));
        }
        let close = rest[open..]
            .find(']')
            .map(|c| open + c)
            .ok_or_else(|| HostlistError::Unbalanced(list.to_owned()))?;
        parts.push(Part::Ranges(parse_ranges(&rest[open + 1..close], list)?));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_owned()));
    }
    Ok(parts)
}

fn entry_len(parts: &[Part]) -> Option<u64> {
    parts.iter().try_fold(1u64, |acc, part| match part {
        Part::Text(_) => Some(acc),
        Part::Ranges(ranges) => {
            let n = ranges
                .iter()
                .try_fold(0u64, |n, &(lo, hi, _)| n.checked_add(hi - lo + 1))?;
            acc.checked_mul(n)
        }
    })
}

fn parse_hostlist(list: &str) -> Result<Vec<Vec<Part>>, HostlistError> {
    let entries = split_entries(list.trim())?
        .into_iter()
        .map(|e| parse_entry(e, list))
        .collect::<Result<Vec<_>, _>>()?;
    let total = entries
        .iter()
        .try_fold(0u64, |acc, parts| acc.checked_add(entry_len(parts)?));
    match total {
        Some(n) if n <= MAX_HOSTS => Ok(entries),
        _ => Err(HostlistError::TooLarge(list.to_owned())),
    }
}

fn expand_entry(parts: &[Part], out: &mut Vec<String>) {
    let mut names = vec![String::new()];
    for part in parts {
        match part {
            Part::Text(t) => names.iter_mut().for_each(|n| n.push_str(t)),
            Part::Ranges(ranges) => {
                let mut next = Vec::new();
                for prefix in &names {
                    for &(lo, hi, width) in ranges {
                        for i in lo..=hi {
                            next.push(format!("{prefix}{i:0width$}"));
                        }
                    }
                }
                names = next;
            }
        }
    }
    out.extend(names);
}

/// Expands a Slurm host list, e.g. `node[01-03,07],gpu5` into `node01`,
/// `node02`, `node03`, `node07`, `gpu5`, in order. Zero padding follows the
/// start of each range (`[08-10]` gives `08 09 10`); several bracket groups in
/// one name expand to their cartesian product (`r[1-2]n[1-2]`).
pub fn expand_hostlist(list: &str) -> Result<Vec<String>, HostlistError> {
    let entries = parse_hostlist(list)?;
    let mut out = Vec::new();
    for parts in &entries {
        expand_entry(parts, &mut out);
    }
    Ok(out)
}

/// The first host of a Slurm host list (the whole list is still validated).
pub fn first_host(list: &str) -> Result<String, HostlistError> {
    let entries = parse_hostlist(list)?;
    let mut name = String::new();
    for part in entries.first().into_iter().flatten() {
        match part {
            Part::Text(t) => name.push_str(t),
            Part::Ranges(ranges) => {
                if let Some(&(lo, _, width)) = ranges.first() {
                    name.push_str(&format!("{lo:0width$}"));
                }
            }
        }
    }
    Ok(name)
}

/// Errors from reading Slurm's variables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlurmError {
    /// A variable that should hold a number does not.
    #[error("Slurm variable {name}={value:?} is not a number")]
    NotANumber {
        /// Variable name.
        name: &'static str,
        /// Its value.
        value: String,
    },
    /// The node list could not be parsed.
    #[error("cannot parse Slurm node list {name}")]
    Nodelist {
        /// Which variable held it.
        name: &'static str,
        /// Why.
        #[source]
        source: HostlistError,
    },
}

/// What Slurm tells a process about its job and, under `srun`, its step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlurmEnv {
    /// `SLURM_JOB_ID`.
    pub job_id: String,
    /// Whether this process was started by `srun` (the `SLURM_STEP_*`
    /// variables are present), as opposed to running in the batch script or
    /// an `salloc` shell, where the job's node layout does not describe us.
    pub in_step: bool,
    /// Nodes in the step (`SLURM_STEP_NUM_NODES`, else `SLURM_NNODES`).
    pub nnodes: Option<u32>,
    /// This node's index in the step, `SLURM_NODEID`.
    pub node_id: Option<u32>,
    /// This task's global index, `SLURM_PROCID`.
    pub proc_id: Option<u32>,
    /// Tasks in the step, `SLURM_STEP_NUM_TASKS`.
    pub step_tasks: Option<u32>,
    /// Name of the variable the node list came from.
    pub nodelist_var: Option<&'static str>,
    /// The node list (`SLURM_STEP_NODELIST`, else `SLURM_JOB_NODELIST`, else
    /// `SLURM_NODELIST`).
    pub nodelist: Option<String>,
    /// GPUs allocated on this node, `SLURM_GPUS_ON_NODE`.
    pub gpus_on_node: Option<u32>,
    /// `SLURM_LAUNCH_NODE_IPADDR`: where srun was run. Only a fallback for
    /// the master address when there is no node list.
    pub launch_node_ip: Option<String>,
}

/// Default MASTER_PORT range for Slurm jobs: `SLURM_PORT_BASE + job % SLURM_PORT_SPAN`,
/// i.e. 20000-29999, below Linux's ephemeral port range (32768+).
pub const SLURM_PORT_BASE: u16 = 20000;
/// See [`SLURM_PORT_BASE`].
pub const SLURM_PORT_SPAN: u64 = 10000;

impl SlurmEnv {
    /// Reads the Slurm variables through `var`. `Ok(None)` when
    /// `SLURM_JOB_ID` is unset, i.e. not inside a Slurm job.
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Result<Option<Self>, SlurmError> {
        let get = |name: &str| {
            var(name)
                .map(|v| v.to_string_lossy().trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let number = |name: &'static str| -> Result<Option<u32>, SlurmError> {
            match get(name) {
                None => Ok(None),
                Some(v) => {
                    // SLURM_GPUS_ON_NODE and friends are plain numbers; be
                    // lenient about forms like "2(x4)" by taking the leading digits.
                    let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
                    digits
                        .parse()
                        .map(Some)
                        .map_err(|_| SlurmError::NotANumber { name, value: v })
                }
            }
        };
        let Some(job_id) = get("SLURM_JOB_ID").or_else(|| get("SLURM_JOBID")) else {
            return Ok(None);
        };
        let in_step = get("SLURM_STEP_NUM_NODES").is_some() || get("SLURM_STEP_NODELIST").is_some();
        let nodelist = [
            "SLURM_STEP_NODELIST",
            "SLURM_JOB_NODELIST",
            "SLURM_NODELIST",
        ]
        .into_iter()
        .find_map(|name| get(name).map(|v| (name, v)));
        Ok(Some(SlurmEnv {
            job_id,
            in_step,
            nnodes: match number("SLURM_STEP_NUM_NODES")? {
                Some(n) => Some(n),
                None => number("SLURM_NNODES")?,
            },
            node_id: number("SLURM_NODEID")?,
            proc_id: number("SLURM_PROCID")?,
            step_tasks: number("SLURM_STEP_NUM_TASKS")?,
            nodelist_var: nodelist.as_ref().map(|(name, _)| *name),
            nodelist: nodelist.map(|(_, v)| v),
            gpus_on_node: number("SLURM_GPUS_ON_NODE")?,
            launch_node_ip: get("SLURM_LAUNCH_NODE_IPADDR"),
        }))
    }

    /// The master address: the first host of the node list (that is where
    /// `SLURM_NODEID` 0 runs), else `SLURM_LAUNCH_NODE_IPADDR`.
    pub fn master_addr(&self) -> Result<Option<String>, SlurmError> {
        if let (Some(name), Some(list)) = (self.nodelist_var, &self.nodelist) {
            return first_host(list)
                .map(Some)
                .map_err(|source| SlurmError::Nodelist { name, source });
        }
        Ok(self.launch_node_ip.clone())
    }

    /// Number of hosts in the node list, if there is one and it parses.
    pub fn nodelist_len(&self) -> Option<usize> {
        expand_hostlist(self.nodelist.as_deref()?)
            .ok()
            .map(|h| h.len())
    }

    /// A MASTER_PORT every node of the job agrees on without talking:
    /// `20000 + SLURM_JOB_ID % 10000` (`None` if the job id is not numeric).
    pub fn derived_port(&self) -> Option<u16> {
        let id: u64 = self.job_id.parse().ok()?;
        let offset = u16::try_from(id % SLURM_PORT_SPAN).ok()?;
        Some(SLURM_PORT_BASE + offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn hosts(list: &str) -> Vec<String> {
        expand_hostlist(list).unwrap()
    }

    #[test]
    fn hostlist_plain_names() {
        assert_eq!(hosts("node1"), ["node1"]);
        assert_eq!(hosts("a,b,c"), ["a", "b", "c"]);
        assert_eq!(hosts(" a , b "), ["a", "b"]);
    }

    #[test]
    fn hostlist_ranges_and_singletons_keep_padding() {
        assert_eq!(
            hosts("node[01-04,07],gpu5"),
            ["node01", "node02", "node03", "node04", "node07", "gpu5"]
        );
        assert_eq!(hosts("n[8-11]"), ["n8", "n9", "n10", "n11"]);
        assert_eq!(hosts("n[08-11]"), ["n08", "n09", "n10", "n11"]);
        assert_eq!(hosts("n[098-101]"), ["n098", "n099", "n100", "n101"]);
        assert_eq!(hosts("n[5]"), ["n5"]);
    }

    #[test]
    fn hostlist_suffixes_and_products() {
        assert_eq!(hosts("n[1-2]-ib"), ["n1-ib", "n2-ib"]);
        assert_eq!(
            hosts("r[1-2]n[01-02]"),
            ["r1n01", "r1n02", "r2n01", "r2n02"]
        );
        assert_eq!(
            hosts("gpu-a[1,3],cpu-[10-11]"),
            ["gpu-a1", "gpu-a3", "cpu-10", "cpu-11"]
        );
    }

    #[test]
    fn hostlist_first_host() {
        assert_eq!(first_host("node[07-09],x").unwrap(), "node07");
        assert_eq!(first_host("r[3-4]n[010-011]").unwrap(), "r3n010");
        assert_eq!(first_host("solo").unwrap(), "solo");
    }

    #[test]
    fn hostlist_errors() {
        assert!(matches!(
            expand_hostlist(""),
            Err(HostlistError::EmptyHost(_))
        ));
        assert!(matches!(
            expand_hostlist("a,,b"),
            Err(HostlistError::EmptyHost(_))
        ));
        assert!(matches!(
            expand_hostlist("n[1-2"),
            Err(HostlistError::Unbalanced(_))
        ));
        assert!(matches!(
            expand_hostlist("n1-2]"),
            Err(HostlistError::Unbalanced(_))
        ));
        assert!(matches!(
            expand_hostlist("n[[1]]"),
            Err(HostlistError::Unbalanced(_))
        ));
        assert!(matches!(
            expand_hostlist("n[]"),
            Err(HostlistError::BadRange { .. })
        ));
        assert!(matches!(
            expand_hostlist("n[a-3]"),
            Err(HostlistError::BadRange { .. })
        ));
        assert!(matches!(
            expand_hostlist("n[1-]"),
            Err(HostlistError::BadRange { .. })
        ));
        assert!(matches!(
            expand_hostlist("n[5-3]"),
            Err(HostlistError::Descending { .. })
        ));
        assert!(matches!(
            expand_hostlist("n[0-99999999999]"),
            Err(HostlistError::TooLarge(_))
        ));
        assert!(matches!(
            first_host("n[0-9999999],m[0-9999999]"),
            Err(HostlistError::TooLarge(_))
        ));
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn not_in_slurm_without_job_id() {
        assert_eq!(SlurmEnv::from_vars(env(&[("SLURM_NODEID", "1")])), Ok(None));
    }

    #[test]
    fn srun_step_variables_are_read() {
        let s = SlurmEnv::from_vars(env(&[
            ("SLURM_JOB_ID", "123456"),
            ("SLURM_NNODES", "8"),
            ("SLURM_STEP_NUM_NODES", "4"),
            ("SLURM_STEP_NUM_TASKS", "4"),
            ("SLURM_NODEID", "2"),
            ("SLURM_PROCID", "2"),
            ("SLURM_JOB_NODELIST", "gpu[01-08]"),
            ("SLURM_STEP_NODELIST", "gpu[03-06]"),
            ("SLURM_GPUS_ON_NODE", "8"),
        ]))
        .unwrap()
        .unwrap();
        assert!(s.in_step);
        assert_eq!(s.nnodes, Some(4));
        assert_eq!(s.node_id, Some(2));
        assert_eq!(s.step_tasks, Some(4));
        assert_eq!(s.gpus_on_node, Some(8));
        assert_eq!(s.master_addr().unwrap().as_deref(), Some("gpu03"));
        assert_eq!(s.nodelist_len(), Some(4));
        assert_eq!(s.derived_port(), Some(23456));
    }

    #[test]
    fn batch_script_is_not_a_step() {
        let s = SlurmEnv::from_vars(env(&[
            ("SLURM_JOB_ID", "77"),
            ("SLURM_NNODES", "2"),
            ("SLURM_NODEID", "0"),
            ("SLURM_JOB_NODELIST", "a,b"),
        ]))
        .unwrap()
        .unwrap();
        assert!(!s.in_step);
        assert_eq!(s.nnodes, Some(2));
        assert_eq!(s.master_addr().unwrap().as_deref(), Some("a"));
    }

    #[test]
    fn bad_numbers_and_nodelists_are_errors() {
        let err = SlurmEnv::from_vars(env(&[("SLURM_JOB_ID", "1"), ("SLURM_NODEID", "x")]));
        assert!(matches!(
            err,
            Err(SlurmError::NotANumber {
                name: "SLURM_NODEID",
                ..
            })
        ));
        let s = SlurmEnv::from_vars(env(&[
            ("SLURM_JOB_ID", "1"),
            ("SLURM_JOB_NODELIST", "n[1-"),
        ]))
        .unwrap()
        .unwrap();
        assert!(s.master_addr().is_err());
    }

    #[test]
    fn launch_node_ip_is_only_a_fallback() {
        let s = SlurmEnv::from_vars(env(&[
            ("SLURM_JOB_ID", "abc"),
            ("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.5"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(s.master_addr().unwrap().as_deref(), Some("10.0.0.5"));
        assert_eq!(s.derived_port(), None);
    }
}
