//! A TCP proxy in front of a service that can hold bytes, in either direction: a
//! service that stops answering without closing its connections, or one that does the
//! work but whose answers are held on the way back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct StallProxy {
    pub port: u16,
    /// Bytes towards the service are held.
    requests: Arc<AtomicBool>,
    /// Bytes from the service are held.
    answers: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallProxy {
    /// Listens on a free loopback port and forwards to `target_port`.
    pub async fn start(target_port: u16) -> std::io::Result<StallProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let requests = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(AtomicBool::new(false));
        let (to_service, from_service) = (requests.clone(), answers.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (to_service, from_service) = (to_service.clone(), from_service.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::select! {
                        _ = pump(ri, wo, to_service) => {}
                        _ = pump(ro, wi, from_service) => {}
                    }
                });
            }
        });
        Ok(StallProxy {
            port,
            requests,
            answers,
            task,
        })
    }

    /// Holds (or lets go) every byte, both ways.
    pub fn stall(&self, on: bool) {
        self.requests.store(on, Ordering::SeqCst);
        self.answers.store(on, Ordering::SeqCst);
    }

    /// Holds (or lets go) only the service's answers: what it is sent, it still does.
    pub fn stall_answers(&self, on: bool) {
        self.answers.store(on, Ordering::SeqCst);
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
