//! Cost of parsing the upgrade request a browser sends, token in the path.
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use eval_proxy::proto::http1::{parse_request, Limits};

/// Chrome 124's upgrade request with a 600-byte token, the size of a PASETO
/// v4.public token with its claims and footer.
fn chrome_request() -> Vec<u8> {
    let token = format!("v4.public.{}", "A".repeat(600 - "v4.public.".len()));
    format!(
        "GET /wsv2/{token} HTTP/1.1\r\n\
         Host: eval.example.com\r\n\
         Connection: Upgrade\r\n\
         Pragma: no-cache\r\n\
         Cache-Control: no-cache\r\n\
         User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36\r\n\
         Upgrade: websocket\r\n\
         Origin: https://replit.com\r\n\
         Sec-WebSocket-Version: 13\r\n\
         Accept-Encoding: gzip, deflate, br, zstd\r\n\
         Accept-Language: en-US,en;q=0.9\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
         \r\n"
    )
    .into_bytes()
}

fn parse(c: &mut Criterion) {
    let request = chrome_request();
    let limits = Limits::default();
    let mut group = c.benchmark_group("http1");
    group.throughput(Throughput::Bytes(request.len() as u64));
    group.bench_function("parse_request", |b| {
        b.iter(|| parse_request(black_box(&request), &limits))
    });
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
