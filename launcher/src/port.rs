//! Picking and checking MASTER_PORT.
//!
//! Rank 0's store (PyTorch's TCPStore, or the Shampoo runtime's own) listens
//! on the wildcard address, so a port counts as free when it can be bound on
//! `0.0.0.0` and, where IPv6 exists, `[::]`. The probe socket is closed
//! before ranks start, so there is a short window in which another program
//! could take the port; that is inherent to handing a port number to a child.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};

/// Errors from probing MASTER_PORT.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// Something already listens on the port.
    #[error(
        "MASTER_PORT {port} is already in use on this node; stop whatever listens on it \
         or choose another --master-port"
    )]
    InUse {
        /// The port.
        port: u16,
    },
    /// The port could not be bound for another reason (e.g. privileged port).
    #[error("cannot bind MASTER_PORT {port} on this node")]
    Unbindable {
        /// The port.
        port: u16,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No free port could be obtained from the OS.
    #[error("cannot find a free port for MASTER_PORT")]
    NoFreePort(#[source] io::Error),
}

/// Asks the OS for a free TCP port (bind to port 0 on the wildcard address).
pub fn pick_free_port() -> Result<u16, PortError> {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(PortError::NoFreePort)
}

/// Checks that `port` can be bound on this node right now.
pub fn check_port_free(port: u16) -> Result<(), PortError> {
    let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    match TcpListener::bind(v4) {
        Ok(listener) => drop(listener),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(PortError::InUse { port }),
        Err(source) => return Err(PortError::Unbindable { port, source }),
    }
    // A dual-stack IPv6 listener also occupies the IPv4 port, and the reverse
    // case (an IPv6-only listener) is caught here. Hosts without IPv6 fail
    // with other errors, which are ignored.
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    match TcpListener::bind(v6) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(PortError::InUse { port }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picked_port_is_free_again_after_the_probe() {
        let port = pick_free_port().unwrap();
        assert_ne!(port, 0);
        check_port_free(port).unwrap();
    }

    #[test]
    fn a_listening_port_is_reported_in_use() {
        let held = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = held.local_addr().unwrap().port();
        let err = check_port_free(port).unwrap_err();
        assert!(
            matches!(err, PortError::InUse { port: p } if p == port),
            "{err}"
        );
        assert!(err.to_string().contains("already in use"));
    }
}
