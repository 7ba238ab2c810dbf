//! One link per peer on one QUIC connection: typed calls, casts and streams.
//!
//! - The **control stream** (the first bidirectional stream, opened by the dialer) carries
//!   the Hello exchange, then casts in both directions, in order.
//! - Every **call** and every **stream** gets a QUIC stream of its own, so one slow or
//!   cancelled request never blocks another, flow control bounds what is in flight, and
//!   cancellation is a stream reset.
//! - A frame that is too large or undecodable closes the whole link with a protocol
//!   violation: a peer that sends garbage is not trusted with anything else.
//!
//! Nothing here queues without bound: incoming messages wait in a channel of
//! `incoming_capacity`, and the number of open requests per peer is capped by QUIC.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, mpsc};

use crate::codec::{CodecError, FrameDecoder, decode_payload, encode_frame};
use crate::error::{CloseCause, LinkError, STREAM_CANCELLED, close_code};
use crate::identity::PeerIdentity;

/// A type that can cross a link.
pub trait Wire: Serialize + DeserializeOwned + Send + 'static {}
impl<T: Serialize + DeserializeOwned + Send + 'static> Wire for T {}

/// The message types one kind of link carries. Both ends of a link use the same protocol;
/// each enum lists what either side may send.
pub trait Protocol: Send + Sync + 'static {
    /// Sent with [`Link::call`]; answered by exactly one `Response`.
    type Request: Wire;
    /// The answer to a `Request`.
    type Response: Wire;
    /// Sent with [`Link::cast`]: one-way, delivered in order.
    type Event: Wire;
    /// Opens a stream with [`Link::open_stream`].
    type Open: Wire;
    /// The items of a stream.
    type Item: Wire;
}

/// The first frame of every request stream.
#[derive(Serialize, Deserialize)]
enum OpenFrame<R, O> {
    Call(R),
    Stream(O),
}

/// Reads frames from a QUIC receive stream; a codec error closes the link.
pub(crate) struct FrameReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    conn: quinn::Connection,
}

impl FrameReader {
    pub(crate) fn new(recv: quinn::RecvStream, conn: quinn::Connection, max_frame: usize) -> Self {
        FrameReader {
            recv,
            decoder: FrameDecoder::new(max_frame),
            conn,
        }
    }

    /// The next frame's payload; `None` when the peer finished the stream cleanly.
    pub(crate) async fn next_payload(&mut self) -> Result<Option<bytes::Bytes>, LinkError> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                Err(e) => return Err(self.violation(e)),
            }
            match self.recv.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => self.decoder.extend(&chunk.bytes),
                Ok(None) => {
                    return match self.decoder.finish() {
                        Ok(()) => Ok(None),
                        Err(e) => Err(self.violation(e)),
                    };
                }
                Err(e) => return Err(read_error(&self.conn, e)),
            }
        }
    }

    /// The next frame decoded as `T`.
    pub(crate) async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, LinkError> {
        match self.next_payload().await? {
            Some(frame) => decode_payload(&frame)
                .map(Some)
                .map_err(|e| self.violation(e)),
            None => Ok(None),
        }
    }

    fn violation(&self, e: CodecError) -> LinkError {
        self.conn
            .close(close_code::PROTOCOL_VIOLATION, e.to_string().as_bytes());
        LinkError::Codec(e)
    }
}

fn peer_label(conn: &quinn::Connection) -> String {
    conn.remote_address().to_string()
}

fn closed(conn: &quinn::Connection, e: quinn::ConnectionError) -> LinkError {
    LinkError::Closed {
        peer: peer_label(conn),
        cause: e.into(),
    }
}

fn read_error(conn: &quinn::Connection, e: quinn::ReadError) -> LinkError {
    match e {
        quinn::ReadError::Reset(_) => LinkError::Cancelled,
        quinn::ReadError::ConnectionLost(e) => closed(conn, e),
        other => LinkError::Closed {
            peer: peer_label(conn),
            cause: CloseCause::Transport(other.to_string()),
        },
    }
}

fn write_error(conn: &quinn::Connection, e: quinn::WriteError) -> LinkError {
    match e {
        quinn::WriteError::Stopped(_) => LinkError::Cancelled,
        quinn::WriteError::ConnectionLost(e) => closed(conn, e),
        other => LinkError::Closed {
            peer: peer_label(conn),
            cause: CloseCause::Transport(other.to_string()),
        },
    }
}

struct Shared {
    conn: quinn::Connection,
    peer: PeerIdentity,
    control: Mutex<quinn::SendStream>,
    max_frame: usize,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The last handle is gone: nobody can use or observe the link any more.
        self.conn.close(close_code::NORMAL, b"link dropped");
    }
}

/// A handle to an established link. Clones share the connection; the link closes when the
/// last handle (including its [`LinkIncoming`]) is dropped, or on [`Link::close`].
pub struct Link<P: Protocol> {
    shared: Arc<Shared>,
    _protocol: PhantomData<fn() -> P>,
}

impl<P: Protocol> Clone for Link<P> {
    fn clone(&self) -> Self {
        Link {
            shared: self.shared.clone(),
            _protocol: PhantomData,
        }
    }
}

impl<P: Protocol> fmt::Debug for Link<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.shared.peer)
            .field("addr", &self.shared.conn.remote_address())
            .finish()
    }
}

impl<P: Protocol> Link<P> {
    /// Starts the link's readers on an established, authenticated connection whose Hello
    /// exchange is done.
    pub(crate) fn start(
        conn: quinn::Connection,
        peer: PeerIdentity,
        control_send: quinn::SendStream,
        control_recv: FrameReader,
        capacity: usize,
        max_frame: usize,
    ) -> (Link<P>, LinkIncoming<P>) {
        let shared = Arc::new(Shared {
            conn: conn.clone(),
            peer,
            control: Mutex::new(control_send),
            max_frame,
        });
        let (tx, rx) = mpsc::channel(capacity.max(1));
        tokio::spawn(read_casts::<P>(control_recv, tx.clone()));
        tokio::spawn(accept_requests::<P>(conn, tx, max_frame));
        let link = Link {
            shared: shared.clone(),
            _protocol: PhantomData,
        };
        let incoming = LinkIncoming { rx, shared };
        (link, incoming)
    }

    /// Who is on the other end (from its verified certificate).
    pub fn peer(&self) -> &PeerIdentity {
        &self.shared.peer
    }

    /// The peer's address.
    pub fn remote_address(&self) -> std::net::SocketAddr {
        self.shared.conn.remote_address()
    }

    /// The current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.shared.conn.rtt()
    }

    /// Sends `request` and waits up to `timeout` for the response.
    ///
    /// # Cancel safety
    /// Dropping the future resets the request's stream; the peer sees its responder fail.
    pub async fn call(
        &self,
        request: P::Request,
        timeout: Duration,
    ) -> Result<P::Response, LinkError> {
        let conn = &self.shared.conn;
        let exchange = async {
            let (mut send, recv) = conn.open_bi().await.map_err(|e| closed(conn, e))?;
            let frame = encode_frame(&OpenFrame::<_, ()>::Call(request), self.shared.max_frame)?;
            send.write_all(&frame)
                .await
                .map_err(|e| write_error(conn, e))?;
            let _ = send.finish();
            let mut reader = FrameReader::new(recv, conn.clone(), self.shared.max_frame);
            match reader.next::<P::Response>().await {
                Ok(Some(response)) => Ok(response),
                Ok(None) | Err(LinkError::Cancelled) => Err(LinkError::Unanswered),
                Err(e) => Err(e),
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| LinkError::Timeout(timeout))?
    }

    /// Sends a one-way event on the control stream; events arrive in the order sent.
    /// Waits while the peer's control stream is full.
    pub async fn cast(&self, event: P::Event) -> Result<(), LinkError> {
        let frame = encode_frame(&event, self.shared.max_frame)?;
        let mut control = self.shared.control.lock().await;
        control
            .write_all(&frame)
            .await
            .map_err(|e| write_error(&self.shared.conn, e))
    }

    /// Opens a stream: the peer receives `open` and answers with items.
    ///
    /// # Cancel safety
    /// Dropping the returned receiver stops the stream; the peer's sender observes it.
    pub async fn open_stream(&self, open: P::Open) -> Result<StreamReceiver<P::Item>, LinkError> {
        let conn = &self.shared.conn;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| closed(conn, e))?;
        let frame = encode_frame(&OpenFrame::<(), _>::Stream(open), self.shared.max_frame)?;
        send.write_all(&frame)
            .await
            .map_err(|e| write_error(conn, e))?;
        let _ = send.finish();
        Ok(StreamReceiver {
            reader: FrameReader::new(recv, conn.clone(), self.shared.max_frame),
            _item: PhantomData,
        })
    }

    /// Closes the link at once, telling the peer `reason`.
    pub fn close(&self, reason: &str) {
        self.shared
            .conn
            .close(close_code::NORMAL, reason.as_bytes());
    }

    /// Resolves when the link is closed, with the cause.
    pub fn closed(&self) -> impl Future<Output = CloseCause> + Send + 'static {
        let conn = self.shared.conn.clone();
        async move { CloseCause::from(conn.closed().await) }
    }

    /// The cause, if the link is already closed.
    pub fn close_cause(&self) -> Option<CloseCause> {
        self.shared.conn.close_reason().map(CloseCause::from)
    }
}

/// Something the peer sent that this node must handle.
pub enum Incoming<P: Protocol> {
    /// A one-way event.
    Cast(P::Event),
    /// A request waiting for its response.
    Call {
        /// The request.
        request: P::Request,
        /// Answers it; dropping it unanswered tells the caller so.
        responder: Responder<P::Response>,
    },
    /// A stream the peer opened.
    Stream {
        /// What the peer asked for.
        open: P::Open,
        /// Where the items go.
        sender: StreamSender<P::Item>,
    },
}

impl<P: Protocol> fmt::Debug for Incoming<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Incoming::Cast(_) => "Incoming::Cast",
            Incoming::Call { .. } => "Incoming::Call",
            Incoming::Stream { .. } => "Incoming::Stream",
        })
    }
}

/// The receiving half of a link: what the peer sends, in a bounded queue.
pub struct LinkIncoming<P: Protocol> {
    rx: mpsc::Receiver<Incoming<P>>,
    shared: Arc<Shared>,
}

impl<P: Protocol> fmt::Debug for LinkIncoming<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkIncoming")
            .field("peer", &self.shared.peer)
            .field("queued", &self.rx.len())
            .finish()
    }
}

impl<P: Protocol> LinkIncoming<P> {
    /// The next incoming message; `None` once the link is closed and everything was taken.
    ///
    /// # Cancel safety
    /// Cancel safe: no message is lost if the future is dropped.
    pub async fn next(&mut self) -> Option<Incoming<P>> {
        self.rx.recv().await
    }

    /// Serves the link until it closes: casts go to `cast`, in order; each call is
    /// answered by `answer` and each stream served by `stream` on a task of its own, so
    /// a slow one never holds up the rest. Dropping a stream's sender refuses it.
    pub async fn serve<A, AF, S, SF>(mut self, mut cast: impl FnMut(P::Event), answer: A, stream: S)
    where
        A: Fn(P::Request) -> AF,
        AF: std::future::Future<Output = P::Response> + Send + 'static,
        S: Fn(P::Open, StreamSender<P::Item>) -> SF,
        SF: std::future::Future<Output = ()> + Send + 'static,
    {
        while let Some(message) = self.next().await {
            match message {
                Incoming::Cast(event) => cast(event),
                Incoming::Call { request, responder } => {
                    let answered = answer(request);
                    tokio::spawn(async move {
                        let _ = responder.respond(answered.await).await;
                    });
                }
                Incoming::Stream { open, sender } => {
                    tokio::spawn(stream(open, sender));
                }
            }
        }
    }
}

async fn read_casts<P: Protocol>(mut control: FrameReader, tx: mpsc::Sender<Incoming<P>>) {
    loop {
        match control.next::<P::Event>().await {
            Ok(Some(event)) => {
                if tx.send(Incoming::Cast(event)).await.is_err() {
                    return;
                }
            }
            Ok(None) => {
                // The peer finished its control stream: it is leaving.
                control
                    .conn
                    .close(close_code::NORMAL, b"peer finished its control stream");
                return;
            }
            Err(_) => return,
        }
    }
}

async fn accept_requests<P: Protocol>(
    conn: quinn::Connection,
    tx: mpsc::Sender<Incoming<P>>,
    max_frame: usize,
) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let tx = tx.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            let mut reader = FrameReader::new(recv, conn.clone(), max_frame);
            let incoming = match reader.next::<OpenFrame<P::Request, P::Open>>().await {
                Ok(Some(OpenFrame::Call(request))) => Incoming::Call {
                    request,
                    responder: Responder {
                        send: Some(send),
                        conn,
                        max_frame,
                        _response: PhantomData,
                    },
                },
                Ok(Some(OpenFrame::Stream(open))) => Incoming::Stream {
                    open,
                    sender: StreamSender {
                        send,
                        conn,
                        max_frame,
                        finished: false,
                        _item: PhantomData,
                    },
                },
                // Opened and abandoned, or the link failed: nothing to deliver.
                Ok(None) | Err(_) => return,
            };
            let _ = tx.send(incoming).await;
        });
    }
}

/// Answers one call. Dropping it unanswered resets the stream: the caller gets
/// [`LinkError::Unanswered`] at once instead of waiting for its timeout.
pub struct Responder<T> {
    send: Option<quinn::SendStream>,
    conn: quinn::Connection,
    max_frame: usize,
    _response: PhantomData<fn(T)>,
}

impl<T: Wire> Responder<T> {
    /// Sends the response.
    pub async fn respond(mut self, response: T) -> Result<(), LinkError> {
        let frame = encode_frame(&response, self.max_frame)?;
        let Some(mut send) = self.send.take() else {
            return Err(LinkError::Unanswered);
        };
        send.write_all(&frame)
            .await
            .map_err(|e| write_error(&self.conn, e))?;
        let _ = send.finish();
        Ok(())
    }
}

impl<T> Drop for Responder<T> {
    fn drop(&mut self) {
        if let Some(send) = &mut self.send {
            let _ = send.reset(STREAM_CANCELLED);
        }
    }
}

/// The sending half of a stream. Each `send` waits while the receiver is behind by more
/// than the stream window, so a slow consumer slows the producer.
///
/// Ends with [`StreamSender::finish`]; dropping it unfinished cancels the stream, which the
/// receiver observes as [`LinkError::Cancelled`] (items it has not read yet may be discarded:
/// a cancelled stream carries no promise about its tail).
pub struct StreamSender<T> {
    send: quinn::SendStream,
    conn: quinn::Connection,
    max_frame: usize,
    finished: bool,
    _item: PhantomData<fn(T)>,
}

impl<T: Wire> StreamSender<T> {
    /// Sends one item. Fails with [`LinkError::Cancelled`] once the receiver has dropped
    /// the stream.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropping the future may leave part of the item written; the stream
    /// must then be cancelled, not continued.
    pub async fn send(&mut self, item: &T) -> Result<(), LinkError> {
        let frame = encode_frame(item, self.max_frame)?;
        self.send
            .write_all(&frame)
            .await
            .map_err(|e| write_error(&self.conn, e))
    }

    /// Ends the stream cleanly: the receiver gets `None` after the last item.
    pub fn finish(mut self) -> Result<(), LinkError> {
        self.finished = true;
        self.send.finish().map_err(|_| LinkError::Cancelled)
    }

    /// Resolves when the receiver stops reading (drops the stream) or the link is lost, so a
    /// producer that is not writing at the moment still notices promptly.
    pub fn cancelled(&self) -> impl Future<Output = ()> + Send + 'static {
        let stopped = self.send.stopped();
        async move {
            let _ = stopped.await;
        }
    }
}

impl<T> Drop for StreamSender<T> {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.send.reset(STREAM_CANCELLED);
        }
    }
}

/// The receiving half of a stream. Dropping it tells the sender to stop.
pub struct StreamReceiver<T> {
    reader: FrameReader,
    _item: PhantomData<fn() -> T>,
}

impl<T: Wire> StreamReceiver<T> {
    /// The next item; `None` when the sender finished the stream.
    /// [`LinkError::Cancelled`] when the sender dropped it, [`LinkError::Closed`] when the
    /// link was lost.
    ///
    /// # Cancel safety
    /// Cancel safe: bytes already received stay buffered for the next call.
    pub async fn next(&mut self) -> Option<Result<T, LinkError>> {
        self.reader.next::<T>().await.transpose()
    }

    /// The items as a [`Stream`] that ends after the first error.
    pub fn into_stream(self) -> impl Stream<Item = Result<T, LinkError>> + Send {
        futures::stream::unfold(Some(self), |state| async move {
            let mut rx = state?;
            match rx.next().await {
                Some(Ok(item)) => Some((Ok(item), Some(rx))),
                Some(Err(e)) => Some((Err(e), None)),
                None => None,
            }
        })
    }
}
