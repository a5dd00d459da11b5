//! A communicator from the variables torchrun and `shampoo-run` set.

use std::sync::Arc;

use super::tcp::TcpCommunicator;
use super::{CommOptions, Communicator, SingleProcess};
use crate::{Error, Result};

/// The rank variables of a launched process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvRanks {
    /// `RANK`.
    pub rank: usize,
    /// `WORLD_SIZE`.
    pub world_size: usize,
    /// `LOCAL_RANK` (0 when unset).
    pub local_rank: usize,
    /// `MASTER_ADDR`.
    pub master_addr: String,
    /// `MASTER_PORT`.
    pub master_port: u16,
}

impl EnvRanks {
    /// Reads the variables through `get` (`std::env::var` in
    /// [`EnvRanks::from_env`]). `None`: not launched (no `WORLD_SIZE`) or a
    /// world of one.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<EnvRanks>> {
        fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T> {
            v.trim()
                .parse()
                .map_err(|_| Error::Env(format!("{name}={v:?} is not a valid number")))
        }
        let Some(world) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let world_size: usize = num("WORLD_SIZE", &world)?;
        if world_size == 0 {
            return Err(Error::Env("WORLD_SIZE=0: a world needs a rank".into()));
        }
        let rank: usize = match get("RANK") {
            Some(r) => num("RANK", &r)?,
            None if world_size == 1 => 0,
            None => {
                return Err(Error::Env(format!(
                    "WORLD_SIZE={world_size} but RANK is not set"
                )));
            }
        };
        if rank >= world_size {
            return Err(Error::Env(format!(
                "RANK={rank} is not below WORLD_SIZE={world_size}"
            )));
        }
        if world_size == 1 {
            return Ok(None);
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(r) => num("LOCAL_RANK", &r)?,
            None => 0,
        };
        let master_addr = get("MASTER_ADDR").ok_or_else(|| {
            Error::Env(format!(
                "WORLD_SIZE={world_size} but MASTER_ADDR is not set (launch with shampoo-run or torchrun)"
            ))
        })?;
        let master_port = get("MASTER_PORT").ok_or_else(|| {
            Error::Env(format!(
                "WORLD_SIZE={world_size} but MASTER_PORT is not set (launch with shampoo-run or torchrun)"
            ))
        })?;
        let master_port: u16 = num("MASTER_PORT", &master_port)?;
        Ok(Some(EnvRanks {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        }))
    }

    /// [`EnvRanks::from_lookup`] over the process environment.
    pub fn from_env() -> Result<Option<EnvRanks>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }
}

/// A communicator from the variables torchrun / `shampoo-run` set (`RANK`,
/// `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`): the TCP host
/// transport, rendezvousing through a store that rank 0 serves on
/// `MASTER_ADDR:MASTER_PORT`. No `WORLD_SIZE` (or 1): [`SingleProcess`].
pub fn communicator_from_env(opts: &CommOptions) -> Result<Arc<dyn Communicator>> {
    match EnvRanks::from_env()? {
        None => Ok(Arc::new(SingleProcess)),
        Some(e) => Ok(Arc::new(TcpCommunicator::connect(
            e.rank,
            e.world_size,
            &e.master_addr,
            e.master_port,
            opts,
        )?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn reads_torchrun_variables() {
        let vars = [
            ("RANK", "2"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", "29500"),
        ];
        assert_eq!(
            EnvRanks::from_lookup(lookup(&vars)).unwrap(),
            Some(EnvRanks {
                rank: 2,
                world_size: 4,
                local_rank: 0,
                master_addr: "node1".into(),
                master_port: 29500
            })
        );
        assert_eq!(EnvRanks::from_lookup(lookup(&[])).unwrap(), None);
        assert_eq!(
            EnvRanks::from_lookup(lookup(&[("WORLD_SIZE", "1")])).unwrap(),
            None
        );
    }

    #[test]
    fn invalid_variables_are_errors_naming_them() {
        let e =
            |vars: &[(&str, &str)]| EnvRanks::from_lookup(lookup(vars)).unwrap_err().to_string();
        assert_eq!(
            e(&[("WORLD_SIZE", "2")]),
            "environment: WORLD_SIZE=2 but RANK is not set"
        );
        assert_eq!(
            e(&[("WORLD_SIZE", "2"), ("RANK", "2")]),
            "environment: RANK=2 is not below WORLD_SIZE=2"
        );
        assert_eq!(
            e(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "h")]),
            "environment: WORLD_SIZE=2 but MASTER_PORT is not set (launch with shampoo-run or torchrun)"
        );
        assert_eq!(
            e(&[("WORLD_SIZE", "x")]),
            "environment: WORLD_SIZE=\"x\" is not a valid number"
        );
    }
}
