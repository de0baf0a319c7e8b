//! What the `:authority` layer on the Unix socket (transport/authority.rs)
//! costs a gRPC request: the same stream of requests, as a grpc-core client
//! sends them (a header block per request, mostly indexed against the
//! client's HPACK table, and a small DATA frame), read through the layer and
//! read as it is. The difference per request is the layer's CPU time. One
//! thread, in memory; medians of several runs with the spread.

use std::time::Instant;

// The layer is private to the agent: its source is compiled in here.
#[path = "../src/transport/authority.rs"]
#[allow(dead_code, unused_imports)]
mod authority;

use authority::AuthorityFixed;

use loona_hpack::Encoder;
use tokio::io::AsyncReadExt;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// `n` requests as grpc-core sends them on the Unix socket.
fn requests(n: u32) -> Vec<u8> {
    let mut encoder = Encoder::new();
    let mut out = Vec::new();
    for i in 0..n {
        let headers: [(&[u8], &[u8]); 8] = [
            (b":scheme", b"http"),
            (b":method", b"POST"),
            (b":authority", b"run%2Fdlm%2Fdlm.sock"),
            (b":path", b"/dlm.v1.Dlm/Status"),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
            (b"user-agent", b"grpc-python/1.85.3 grpc-c/52.0.0 (linux; chttp2)"),
            (b"grpc-accept-encoding", b"identity, deflate, gzip"),
        ];
        let block = encoder.encode(headers);
        let stream = 1 + 2 * i;
        out.extend(frame(0x1, 0x4, stream, &block));
        out.extend(frame(0x0, 0x1, stream, &[0, 0, 0, 0, 0]));
    }
    out
}

fn main() {
    let test_mode = !std::env::args().any(|a| a == "--bench");
    let (n, runs) = if test_mode { (1_000, 1) } else { (200_000, 7) };
    let sent = requests(n);
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let (mut through, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (t, r) = runtime.block_on(async {
            let begun = Instant::now();
            let mut out = Vec::with_capacity(sent.len() * 2);
            AuthorityFixed::new(&sent[..]).read_to_end(&mut out).await.expect("passes");
            let t = begun.elapsed();
            let begun = Instant::now();
            let mut plain = Vec::with_capacity(sent.len() * 2);
            (&sent[..]).read_to_end(&mut plain).await.expect("reads");
            (t, begun.elapsed())
        });
        through.push(t.as_secs_f64() * 1e9 / f64::from(n));
        raw.push(r.as_secs_f64() * 1e9 / f64::from(n));
    }
    through.sort_by(f64::total_cmp);
    raw.sort_by(f64::total_cmp);
    let median = |v: &[f64]| v[v.len() / 2];
    println!(
        "authority layer: {n} gRPC requests ({} bytes), {runs} runs, one thread: through the layer {:.0} ns per \
         request median (spread {:.0} to {:.0}), read as is {:.0} ns; the layer adds {:.0} ns per request",
        sent.len(),
        median(&through),
        through[0],
        through[through.len() - 1],
        median(&raw),
        median(&through) - median(&raw)
    );
}
