//! The rendezvous key-value store: rank 0 serves it on
//! `MASTER_ADDR:MASTER_PORT`; every rank (rank 0 included) is a client.
//!
//! Protocol (all integers little-endian), one request and one reply at a
//! time per connection:
//!
//! - `SET`: `u8 1, u32 key_len, key, u32 value_len, value` -> `u8 0`.
//! - `GET`: `u8 2, u32 key_len, key, u64 timeout_ms` -> `u8 0, u32 len,
//!   value` when the key is (or becomes, within the timeout) set; `u8 1`
//!   when the timeout passes first.
//!
//! Every client wait has a deadline; the server waits on a condition
//! variable, never polls.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Error, Result};

const SET: u8 = 1;
const GET: u8 = 2;
/// Longest key or value accepted (the store holds addresses and ids).
const MAX_LEN: u32 = 1 << 20;

#[derive(Default)]
struct Data {
    map: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
    changed: Condvar,
}

/// The store's server; stops (and frees its port) when dropped.
pub struct StoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StoreServer {
    /// Serves on `0.0.0.0:port` (all interfaces, so ranks on other hosts can
    /// reach it). A port already in use is an error naming it.
    pub fn bind(port: u16) -> Result<StoreServer> {
        let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| Error::Rendezvous {
            addr: format!("0.0.0.0:{port}"),
            reason: format!(
                "rank 0 cannot serve the rendezvous store on port {port}: {e} (is MASTER_PORT in use by another job?)"
            ),
        })?;
        let addr = listener.local_addr().map_err(|e| Error::Rendezvous {
            addr: format!("0.0.0.0:{port}"),
            reason: e.to_string(),
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Rendezvous {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let data = Arc::new(Data::default());
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("shampoo-store".into())
                .spawn(move || accept_loop(listener, data, stop))
                .map_err(|e| Error::Rendezvous {
                    addr: addr.to_string(),
                    reason: format!("cannot start the store thread: {e}"),
                })?
        };
        Ok(StoreServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address (port 0 in [`StoreServer::bind`] picks one).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, data: Arc<Data>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let data = data.clone();
                let stop = stop.clone();
                // Connection threads end when their client disconnects or the
                // server stops (reads time out every 100 ms to check).
                let _ = std::thread::Builder::new()
                    .name("shampoo-store-conn".into())
                    .spawn(move || {
                        let _ = serve(stream, &data, &stop);
                    });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn serve(mut s: TcpStream, data: &Data, stop: &AtomicBool) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    loop {
        let mut op = [0u8; 1];
        match s.read(&mut op) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e),
        }
        // The rest of a request follows at once.
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let key = read_blob(&mut s)?;
        match op[0] {
            SET => {
                let value = read_blob(&mut s)?;
                let mut map = data.map.lock().unwrap_or_else(|e| e.into_inner());
                map.insert(key, value);
                data.changed.notify_all();
                drop(map);
                s.write_all(&[0])?;
            }
            GET => {
                let mut ms = [0u8; 8];
                s.read_exact(&mut ms)?;
                let deadline = Instant::now() + Duration::from_millis(u64::from_le_bytes(ms));
                let mut map = data.map.lock().unwrap_or_else(|e| e.into_inner());
                let value = loop {
                    if let Some(v) = map.get(&key) {
                        break Some(v.clone());
                    }
                    let now = Instant::now();
                    if now >= deadline || stop.load(Ordering::SeqCst) {
                        break None;
                    }
                    // Wake at least every 100 ms to notice a stop.
                    let wait = (deadline - now).min(Duration::from_millis(100));
                    map = data
                        .changed
                        .wait_timeout(map, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                };
                drop(map);
                match value {
                    Some(v) => {
                        s.write_all(&[0])?;
                        write_blob(&mut s, &v)?;
                    }
                    None => s.write_all(&[1])?,
                }
            }
            _ => return Ok(()),
        }
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
    }
}

fn read_blob(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut n = [0u8; 4];
    s.read_exact(&mut n)?;
    let n = u32::from_le_bytes(n);
    if n > MAX_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "blob too long",
        ));
    }
    let mut v = vec![0u8; n as usize];
    s.read_exact(&mut v)?;
    Ok(v)
}

fn write_blob(s: &mut TcpStream, v: &[u8]) -> std::io::Result<()> {
    let n = u32::try_from(v.len())
        .ok()
        .filter(|&n| n <= MAX_LEN)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "blob too long"))?;
    s.write_all(&n.to_le_bytes())?;
    s.write_all(v)
}

/// A client connection to the store.
pub struct StoreClient {
    stream: TcpStream,
    addr: String,
    timeout: Duration,
}

impl StoreClient {
    /// Connects to `host:port`, retrying (the server may not be up yet)
    /// until `timeout` has passed.
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<StoreClient> {
        let addr = format!("{host}:{port}");
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no address");
        loop {
            let addrs: Vec<SocketAddr> = match (host, port).to_socket_addrs() {
                Ok(a) => a.collect(),
                Err(e) => {
                    return Err(Error::Rendezvous {
                        addr,
                        reason: format!("cannot resolve MASTER_ADDR {host:?}: {e}"),
                    });
                }
            };
            for a in &addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                match TcpStream::connect_timeout(
                    a,
                    left.clamp(Duration::from_millis(1), Duration::from_secs(2)),
                ) {
                    Ok(stream) => {
                        let _ = stream.set_nodelay(true);
                        return Ok(StoreClient {
                            stream,
                            addr,
                            timeout,
                        });
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Rendezvous {
                    addr,
                    reason: format!(
                        "no store answered within {timeout:?} (last error: {last}); did rank 0 start?"
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The local address of the connection: the interface through which
    /// this host reaches the store (and so, likely, the other ranks).
    pub fn local_ip(&self) -> Result<std::net::IpAddr> {
        self.stream
            .local_addr()
            .map(|a| a.ip())
            .map_err(|e| self.io(e))
    }

    fn io(&self, e: std::io::Error) -> Error {
        Error::Rendezvous {
            addr: self.addr.clone(),
            reason: format!("store connection failed: {e}"),
        }
    }

    /// Sets `key` to `value`.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let _ = self.stream.set_read_timeout(Some(self.timeout));
        let _ = self.stream.set_write_timeout(Some(self.timeout));
        let r = (|| -> std::io::Result<()> {
            self.stream.write_all(&[SET])?;
            write_blob(&mut self.stream, key.as_bytes())?;
            write_blob(&mut self.stream, value)?;
            let mut ok = [0u8; 1];
            self.stream.read_exact(&mut ok)
        })();
        r.map_err(|e| self.io(e))
    }

    /// The value of `key`, waiting up to the timeout for it to be set.
    pub fn get(&mut self, key: &str) -> Result<Vec<u8>> {
        match self.wait(key)? {
            Some(v) => Ok(v),
            None => Err(Error::Rendezvous {
                addr: self.addr.clone(),
                reason: format!("key {key:?} was not set within {:?}", self.timeout),
            }),
        }
    }

    /// The value of `key`, or `None` when it is not set within the timeout.
    pub fn wait(&mut self, key: &str) -> Result<Option<Vec<u8>>> {
        let timeout = self.timeout;
        // The server answers within `timeout`; allow some slack for the reply.
        let _ = self
            .stream
            .set_read_timeout(Some(timeout + Duration::from_secs(5)));
        let _ = self.stream.set_write_timeout(Some(timeout));
        let r = (|| -> std::io::Result<Option<Vec<u8>>> {
            self.stream.write_all(&[GET])?;
            write_blob(&mut self.stream, key.as_bytes())?;
            let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            self.stream.write_all(&ms.to_le_bytes())?;
            let mut status = [0u8; 1];
            self.stream.read_exact(&mut status)?;
            if status[0] == 0 {
                Ok(Some(read_blob(&mut self.stream)?))
            } else {
                Ok(None)
            }
        })();
        r.map_err(|e| self.io(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_waits_for_a_later_set_and_times_out_on_a_missing_key() {
        let server = StoreServer::bind(0).unwrap();
        let port = server.port();
        let t = Duration::from_millis(300);
        let mut a = StoreClient::connect("127.0.0.1", port, t).unwrap();
        let setter = std::thread::spawn(move || {
            let mut b = StoreClient::connect("127.0.0.1", port, t).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            b.set("k", b"v1").unwrap();
        });
        assert_eq!(a.get("k").unwrap(), b"v1");
        setter.join().unwrap();
        let start = Instant::now();
        let err = a.get("missing").unwrap_err().to_string();
        assert!(start.elapsed() >= t, "{:?}", start.elapsed());
        assert_eq!(
            err,
            format!("rendezvous at 127.0.0.1:{port}: key \"missing\" was not set within 300ms")
        );
    }

    #[test]
    fn a_port_in_use_is_an_error_naming_it() {
        let held = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let err = StoreServer::bind(port).err().unwrap().to_string();
        assert!(
            err.starts_with(&format!(
                "rendezvous at 0.0.0.0:{port}: rank 0 cannot serve the rendezvous store on port {port}: "
            )),
            "{err}"
        );
    }
}
