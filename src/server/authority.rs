//! Lets every official gRPC client reach us over a unix socket.
//!
//! Go's gRPC sends `:authority: localhost` on a unix socket; gRPC C-core (Python,
//! C++, Ruby, PHP), grpc-java and grpc-swift send the socket's path, raw
//! (`/tmp/csi.sock`) or percent-encoded (`%2Ftmp%2Fcsi.sock`). h2, under tonic,
//! parses `:authority` as a URI authority (`http::uri::Authority`) when it turns
//! the header block into a request, and resets the stream with PROTOCOL_ERROR when
//! that fails; it has no setting to relax this, and no release accepts it. On a unix
//! socket the authority names nothing (there is no host to reach), so each
//! accepted connection is relayed through a task that forwards every byte as it
//! came except the client's header blocks: those are decoded (HPACK, with the
//! client's dynamic table mirrored by `loona_hpack`), an authority that h2 would
//! refuse is replaced by `localhost`, and the block is encoded again with literals
//! only (no Huffman, no dynamic table: h2's table then stays empty and can never
//! disagree with ours). The server-to-client direction is copied untouched.
//!
//! The relay is only as strict as it must be to stay in step with the client's
//! encoder: a header block it cannot decode, one larger than
//! [`MAX_HEADER_BLOCK`] or a HEADERS frame not followed by its CONTINUATIONs ends
//! the connection, as h2 itself would (a COMPRESSION_ERROR or PROTOCOL_ERROR is a
//! connection error in HTTP/2).

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

/// What every HTTP/2 connection starts with (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Largest header block taken from a client, compressed or decoded (gRPC clients
/// default to 8 KiB of metadata; h2's own default limit is far larger, but a
/// client on our socket has no use for more, and a decoded block can be much
/// larger than its compressed form).
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;

/// The frame size every HTTP/2 server accepts (SETTINGS_MAX_FRAME_SIZE's
/// initial value): re-encoded blocks are cut into frames of at most this.
const MAX_FRAME: usize = 16_384;

/// The dynamic table size a client's encoder may use: the initial
/// SETTINGS_HEADER_TABLE_SIZE, which our servers never change.
const CLIENT_TABLE_SIZE: usize = 4096;

/// What a refused authority becomes; Go clients send it too.
const LOCAL_AUTHORITY: &[u8] = b"localhost";

/// Why a relayed connection was ended.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("header block of more than {MAX_HEADER_BLOCK} bytes")]
    TooLarge,
    #[error("HEADERS frame on stream {0} not followed by its CONTINUATION frames")]
    Interleaved(u32),
    #[error("malformed HEADERS frame on stream {0}")]
    Malformed(u32),
    #[error("header block does not decode: {0}")]
    Hpack(loona_hpack::decoder::DecoderError),
}

/// One accepted unix connection as the gRPC server sees it: the relay's end of an
/// in-memory pipe, with the real peer's credentials and address.
pub struct Relayed {
    pipe: DuplexStream,
    info: UdsConnectInfo,
}

/// Starts relaying `client` and returns the end the gRPC server reads from.
pub fn relay(client: UnixStream) -> Relayed {
    let info = client.connect_info();
    // The pipe's buffer bounds what sits between the two sides in each direction;
    // one maximal frame and its header fits.
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        if let Err(e) = run(client, ours).await {
            tracing::debug!(error = %e, "unix socket connection ended");
        }
    });
    Relayed { pipe: theirs, info }
}

async fn run(client: UnixStream, server: DuplexStream) -> Result<(), RelayError> {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = tokio::io::split(server);
    let up = async {
        let result = forward_requests(&mut client_read, &mut server_write).await;
        // The server then sees the end of its input and closes the connection,
        // which ends the other direction too.
        let _ = server_write.shutdown().await;
        result
    };
    let down = async {
        let result = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
        result
    };
    let (up, down) = tokio::join!(up, down);
    up?;
    down?;
    Ok(())
}

/// Copies the client's side of the connection to the server, re-encoding every
/// header block; returns at the client's end of input.
async fn forward_requests<R, W>(from: &mut R, to: &mut W) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; PREFACE.len()];
    if !read_or_eof(from, &mut preface).await? {
        return Ok(());
    }
    to.write_all(&preface).await?;
    if &preface != PREFACE {
        // Not HTTP/2 with prior knowledge: the server refuses it; pass it on as is.
        tokio::io::copy(from, to).await?;
        return Ok(());
    }
    let mut decoder = loona_hpack::Decoder::new();
    decoder.set_max_allowed_table_size(CLIENT_TABLE_SIZE);
    let mut header = [0u8; 9];
    while read_or_eof(from, &mut header).await? {
        let frame = FrameHeader::parse(&header);
        if frame.kind != FRAME_HEADERS {
            // Every other frame, CONTINUATION out of place included (the server
            // refuses that), goes through unchanged and unbuffered.
            to.write_all(&header).await?;
            let copied = tokio::io::copy(&mut (&mut *from).take(frame.len as u64), to).await?;
            if copied < frame.len as u64 {
                return Ok(());
            }
            continue;
        }
        let (priority, mut block) = read_headers_frame(from, &frame).await?;
        let mut flags = frame.flags;
        while flags & FLAG_END_HEADERS == 0 {
            from.read_exact(&mut header).await?;
            let next = FrameHeader::parse(&header);
            if next.kind != FRAME_CONTINUATION || next.stream != frame.stream {
                return Err(RelayError::Interleaved(frame.stream));
            }
            if block.len() + next.len > MAX_HEADER_BLOCK {
                return Err(RelayError::TooLarge);
            }
            let start = block.len();
            block.resize(start + next.len, 0);
            from.read_exact(&mut block[start..]).await?;
            flags |= next.flags & FLAG_END_HEADERS;
        }
        let fields = decode(&mut decoder, &block)?;
        let encoded = encode(&fields);
        write_headers(to, &frame, priority, &encoded).await?;
    }
    Ok(())
}

struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(b: &[u8; 9]) -> FrameHeader {
        FrameHeader {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    fn write(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; 9] {
        let l = (len as u32).to_be_bytes();
        let s = stream.to_be_bytes();
        [l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]
    }
}

/// Reads exactly `buf.len()` bytes; `false` when the input ended before the first.
async fn read_or_eof<R: AsyncRead + Unpin>(from: &mut R, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match from.read(&mut buf[filled..]).await? {
            0 if filled == 0 => return Ok(false),
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => filled += n,
        }
    }
    Ok(true)
}

/// A HEADERS frame's payload: its priority fields (if any) and its block
/// fragment, padding removed.
async fn read_headers_frame<R: AsyncRead + Unpin>(
    from: &mut R,
    frame: &FrameHeader,
) -> Result<(Option<[u8; 5]>, Vec<u8>), RelayError> {
    if frame.len > MAX_HEADER_BLOCK {
        return Err(RelayError::TooLarge);
    }
    let mut payload = vec![0u8; frame.len];
    from.read_exact(&mut payload).await?;
    let mut rest = &payload[..];
    let mut pad = 0;
    if frame.flags & FLAG_PADDED != 0 {
        let (&len, tail) = rest
            .split_first()
            .ok_or(RelayError::Malformed(frame.stream))?;
        pad = usize::from(len);
        rest = tail;
    }
    let mut priority = None;
    if frame.flags & FLAG_PRIORITY != 0 {
        let (fields, tail) = rest
            .split_first_chunk::<5>()
            .ok_or(RelayError::Malformed(frame.stream))?;
        priority = Some(*fields);
        rest = tail;
    }
    if pad > rest.len() {
        return Err(RelayError::Malformed(frame.stream));
    }
    Ok((priority, rest[..rest.len() - pad].to_vec()))
}

/// A header list: (name, value) pairs, in order.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// The block's header fields, with an authority h2 would refuse replaced.
fn decode(decoder: &mut loona_hpack::Decoder<'_>, block: &[u8]) -> Result<Fields, RelayError> {
    let mut fields = Vec::new();
    // Counted as HTTP/2 counts a header list's size: name, value and 32 per field.
    // Indexed fields make a block decode to far more than its own size.
    let mut size = 0usize;
    decoder
        .decode_with_cb(block, |name, value| {
            size = size.saturating_add(name.len() + value.len() + 32);
            if size <= MAX_HEADER_BLOCK {
                fields.push((name.into_owned(), value.into_owned()));
            }
        })
        .map_err(RelayError::Hpack)?;
    if size > MAX_HEADER_BLOCK {
        return Err(RelayError::TooLarge);
    }
    for (name, value) in &mut fields {
        if name.as_slice() == b":authority" && !h2_accepts_authority(value) {
            *value = LOCAL_AUTHORITY.to_vec();
        }
    }
    Ok(fields)
}

/// Whether h2 takes `value` as an `:authority`: it parses it as this.
fn h2_accepts_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// A header block of literal fields without indexing and with new names, strings
/// not Huffman-coded (RFC 7541 §6.2.2): nothing enters the server's dynamic table.
fn encode(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        encode_string(&mut out, name);
        encode_string(&mut out, value);
    }
    out
}

/// A string literal: its length as an integer with a 7-bit prefix (RFC 7541
/// §5.1), the Huffman bit clear, then the bytes.
fn encode_string(out: &mut Vec<u8>, bytes: &[u8]) {
    const PREFIX_MAX: usize = 0x7f;
    let len = bytes.len();
    if len < PREFIX_MAX {
        out.push(len as u8);
    } else {
        out.push(PREFIX_MAX as u8);
        let mut rest = len - PREFIX_MAX;
        while rest >= 0x80 {
            out.push((rest & 0x7f) as u8 | 0x80);
            rest >>= 7;
        }
        out.push(rest as u8);
    }
    out.extend_from_slice(bytes);
}

/// Writes `block` as one HEADERS frame and as many CONTINUATION frames as it needs.
async fn write_headers<W: AsyncWrite + Unpin>(
    to: &mut W,
    frame: &FrameHeader,
    priority: Option<[u8; 5]>,
    block: &[u8],
) -> std::io::Result<()> {
    let first_room = MAX_FRAME - priority.map_or(0, |p| p.len());
    let (first, mut rest) = block.split_at(block.len().min(first_room));
    let mut flags = frame.flags & (FLAG_END_STREAM | FLAG_PRIORITY);
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    let mut out = Vec::with_capacity(block.len() + 9 * (block.len() / MAX_FRAME + 2));
    let priority = priority.unwrap_or_default();
    let priority = &priority[..if flags & FLAG_PRIORITY != 0 { 5 } else { 0 }];
    out.extend_from_slice(&FrameHeader::write(
        priority.len() + first.len(),
        FRAME_HEADERS,
        flags,
        frame.stream,
    ));
    out.extend_from_slice(priority);
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = tail;
        let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        out.extend_from_slice(&FrameHeader::write(
            chunk.len(),
            FRAME_CONTINUATION,
            flags,
            frame.stream,
        ));
        out.extend_from_slice(chunk);
    }
    to.write_all(&out).await
}

impl Connected for Relayed {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Relayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.pipe).poll_read(cx, buf)
    }
}

impl AsyncWrite for Relayed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.pipe).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.pipe).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.pipe).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = FrameHeader::write(payload.len(), kind, flags, stream).to_vec();
        out.extend_from_slice(payload);
        out
    }

    /// Runs `input` through the client-to-server direction and splits the output
    /// into frames: (kind, flags, stream, payload).
    async fn relay_bytes(input: Vec<u8>) -> Result<Vec<(u8, u8, u32, Vec<u8>)>, RelayError> {
        let mut out = Vec::new();
        forward_requests(&mut &input[..], &mut out).await?;
        assert_eq!(&out[..24], PREFACE);
        let mut rest = &out[24..];
        let mut frames = Vec::new();
        while !rest.is_empty() {
            let h = FrameHeader::parse(rest[..9].try_into().unwrap());
            frames.push((h.kind, h.flags, h.stream, rest[9..9 + h.len].to_vec()));
            rest = &rest[9 + h.len..];
        }
        Ok(frames)
    }

    /// Decodes the server's view of the header blocks in `frames`, in order.
    fn server_view(frames: &[(u8, u8, u32, Vec<u8>)]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut block = Vec::new();
        for (kind, flags, _, payload) in frames {
            match *kind {
                FRAME_HEADERS => {
                    let skip = if flags & FLAG_PRIORITY != 0 { 5 } else { 0 };
                    block.extend_from_slice(&payload[skip..]);
                }
                FRAME_CONTINUATION => block.extend_from_slice(payload),
                _ => continue,
            }
            if flags & FLAG_END_HEADERS != 0 {
                blocks.push(decoder.decode(&block).unwrap());
                block.clear();
            }
        }
        blocks
    }

    fn request(authority: &[u8]) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":path", b"/csi.v1.Identity/GetPluginInfo".to_vec()),
            (b":authority", authority.to_vec()),
            (b"content-type", b"application/grpc".to_vec()),
            (b"te", b"trailers".to_vec()),
        ]
    }

    fn authority_of(block: &[(Vec<u8>, Vec<u8>)]) -> &[u8] {
        &block.iter().find(|(n, _)| n == b":authority").unwrap().1
    }

    /// A literal field with an indexed name, added to the dynamic table (as
    /// gRPC C-core sends `:authority`).
    fn indexed_name(out: &mut Vec<u8>, index: u8, value: &[u8]) {
        out.push(0x40 | index);
        encode_string(out, value);
    }

    #[tokio::test]
    async fn refused_authorities_become_localhost_and_the_rest_is_kept() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        // The first request adds its fields to the client's dynamic table...
        let mut first = vec![0x83, 0x86]; // :method POST, :scheme http
        indexed_name(&mut first, 4, b"/csi.v1.Identity/GetPluginInfo");
        indexed_name(&mut first, 1, b"%2Ftmp%2Fcsi.sock");
        indexed_name(&mut first, 31, b"application/grpc");
        first.push(0x40);
        encode_string(&mut first, b"te");
        encode_string(&mut first, b"trailers");
        // ...the second refers to them: :path is 65, :authority 64,
        // content-type 63, te 62.
        let second = vec![0x83, 0x86, 0xc1, 0xc0, 0xbf, 0xbe];
        // The third sends the raw path, as grpc-java does.
        let mut encoder = loona_hpack::Encoder::new();
        let third = encoder.encode(request(b"/tmp/csi.sock").iter().map(|(n, v)| (*n, &v[..])));
        for (i, block) in [first, second, third].iter().enumerate() {
            let stream = 1 + 2 * i as u32;
            input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, stream, block));
            input.extend(frame(0x0, FLAG_END_STREAM, stream, b"\0\0\0\0\0"));
        }
        let frames = relay_bytes(input).await.unwrap();
        let blocks = server_view(&frames);
        assert_eq!(blocks.len(), 3);
        for block in &blocks {
            assert_eq!(authority_of(block), b"localhost");
            let names: Vec<&[u8]> = block.iter().map(|(n, _)| &n[..]).collect();
            assert_eq!(
                names,
                request(b"x").iter().map(|(n, _)| *n).collect::<Vec<_>>()
            );
            assert!(block.contains(&(
                b":path".to_vec(),
                b"/csi.v1.Identity/GetPluginInfo".to_vec()
            )));
            assert!(block.contains(&(b"te".to_vec(), b"trailers".to_vec())));
        }
        // Other frames pass unchanged: SETTINGS and the three DATA frames.
        assert_eq!(frames[0], (0x4, 0, 0, vec![]));
        let data: Vec<_> = frames.iter().filter(|f| f.0 == 0x0).collect();
        assert_eq!(data.len(), 3);
        assert!(
            data.iter()
                .all(|f| f.1 == FLAG_END_STREAM && f.3 == b"\0\0\0\0\0")
        );
    }

    #[tokio::test]
    async fn valid_authorities_are_left_alone() {
        for authority in [&b"localhost"[..], b"example.com:443", b"[::1]:50051"] {
            let mut encoder = loona_hpack::Encoder::new();
            let block = encoder.encode(request(authority).iter().map(|(n, v)| (*n, &v[..])));
            let mut input = PREFACE.to_vec();
            input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block));
            let blocks = server_view(&relay_bytes(input).await.unwrap());
            assert_eq!(authority_of(&blocks[0]), authority);
        }
    }

    #[tokio::test]
    async fn padding_priority_and_continuations_are_followed() {
        let mut encoder = loona_hpack::Encoder::new();
        let block = encoder.encode(request(b"/tmp/csi.sock").iter().map(|(n, v)| (*n, &v[..])));
        let (a, b) = block.split_at(block.len() / 2);
        let mut payload = vec![3u8]; // pad length
        payload.extend([0, 0, 0, 0, 15]); // priority: no dependency, weight 16
        payload.extend(a);
        payload.extend([0, 0, 0]); // padding
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            FRAME_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            5,
            &payload,
        ));
        input.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 5, b));
        let frames = relay_bytes(input).await.unwrap();
        assert_eq!(frames.len(), 1);
        let (kind, flags, stream, payload) = &frames[0];
        assert_eq!((*kind, *stream), (FRAME_HEADERS, 5));
        assert_eq!(*flags, FLAG_PRIORITY | FLAG_END_STREAM | FLAG_END_HEADERS);
        assert_eq!(&payload[..5], &[0, 0, 0, 0, 15]);
        assert_eq!(authority_of(&server_view(&frames)[0]), b"localhost");

        // A block too large for one frame goes out as HEADERS + CONTINUATION.
        let mut big = request(b"/tmp/csi.sock");
        big.push((b"x-big", vec![b'a'; 40_000]));
        // A new connection: a new encoder, as the relay's decoder is new too.
        let mut encoder = loona_hpack::Encoder::new();
        let block = encoder.encode(big.iter().map(|(n, v)| (*n, &v[..])));
        let mut input = PREFACE.to_vec();
        for (i, chunk) in block.chunks(MAX_FRAME).enumerate() {
            let last = (i + 1) * MAX_FRAME >= block.len();
            let kind = if i == 0 {
                FRAME_HEADERS
            } else {
                FRAME_CONTINUATION
            };
            input.extend(frame(
                kind,
                if last { FLAG_END_HEADERS } else { 0 },
                7,
                chunk,
            ));
        }
        let frames = relay_bytes(input).await.unwrap();
        assert!(frames.len() >= 3, "{}", frames.len());
        assert!(frames.iter().all(|f| f.3.len() <= MAX_FRAME));
        let blocks = server_view(&frames);
        assert_eq!(authority_of(&blocks[0]), b"localhost");
        assert_eq!(blocks[0].last().unwrap().1.len(), 40_000);
    }

    #[tokio::test]
    async fn broken_or_oversized_blocks_end_the_connection() {
        let mut input = PREFACE.to_vec();
        // An index past both tables.
        input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &[0xff, 0x7f]));
        assert!(matches!(
            relay_bytes(input).await,
            Err(RelayError::Hpack(_))
        ));

        // Another frame between HEADERS and its CONTINUATION.
        let mut input = PREFACE.to_vec();
        input.extend(frame(FRAME_HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, b"x"));
        assert!(matches!(
            relay_bytes(input).await,
            Err(RelayError::Interleaved(1))
        ));

        // A small block that decodes to a huge list: one big entry indexed over
        // and over.
        let mut encoder = loona_hpack::Encoder::new();
        let mut block = encoder.encode([(&b"x-a"[..], &vec![b'a'; 4000][..])].into_iter());
        block.extend(std::iter::repeat_n(0xbe, 200)); // index 62: the entry just added
        let mut input = PREFACE.to_vec();
        input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block));
        assert!(matches!(
            relay_bytes(input).await,
            Err(RelayError::TooLarge)
        ));
    }
}
