//! The control pipe's connections (SPEC.md "The control pipe": a slow, idle or
//! hostile client never delays the guest or other clients).
//!
//! - Only molt's own uid is admitted (SO_PEERCRED, `control::check_peer`).
//! - At most `MAX_CLIENTS` at once. While every slot is taken the listener is not
//!   watched: further connections wait in the kernel's listen backlog (std listens
//!   with the largest backlog, `somaxconn`) and are accepted when a slot frees.
//! - A client idle for `IDLE_TIMEOUT` is closed; the main loop's epoll timeout is
//!   the earliest such deadline, so no timer thread is needed.
//! - Each turn of the main loop serves at most one command per client, starting
//!   from a rotating slot: a client pipelining a thousand commands delays another
//!   one's reply by at most one command. A client with a complete line buffered is
//!   not read from, so what it floods stays in its own socket buffer.
//! - Replies never block: what the socket cannot take waits (with the client's
//!   further commands) until it reads; one that never does is closed as idle.
//! - After `events` a client is a watcher: at most `MAX_WATCHERS`, never idle,
//!   its input read and dropped. Event lines queue for it without blocking; one
//!   that falls `MAX_WATCHER_BACKLOG` bytes behind is closed.
//!
//! `Clients` is the bookkeeping, driven with an explicit clock so that it is tested
//! without KVM; `Loop` glues it to the listener and to `Loop::execute`.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{Loop, Next, Token};
use crate::control::{
    self, Client, Input, Line, IDLE_TIMEOUT, MAX_CLIENTS, MAX_WATCHERS, MAX_WATCHER_BACKLOG,
};

/// One connected client and what the loop knows about it.
struct Slot {
    client: Client,
    /// When bytes last came in or went out: the idle clock starts here.
    active_at: Instant,
    /// The peer closed its side: what it sent is still served, then it is closed.
    eof: bool,
    /// Held by an operation under way: not read, not served, never idle (its
    /// replies still go out).
    held: bool,
    /// What epoll watches this client for; `None` while not registered at all
    /// (an empty interest would still report hang-ups, over and over).
    watched: Option<EventSet>,
    /// Sent `events`: it gets event lines and is served no more commands.
    watcher: bool,
}

impl Slot {
    /// Has a command to serve this turn.
    fn ready(&self) -> bool {
        !self.held && !self.watcher && !self.client.output_pending() && self.client.has_line()
    }

    /// Replies waiting go out even while held; input is read only when there
    /// is no command buffered, so a flood stays in the client's socket.
    fn wanted(&self) -> Option<EventSet> {
        if self.client.output_pending() {
            Some(EventSet::OUT)
        } else if self.held || self.eof || self.client.has_line() {
            None
        } else {
            Some(EventSet::IN)
        }
    }

    /// When the idle timeout closes it, unless something happens first.
    fn deadline(&self) -> Option<Instant> {
        (!self.held && !self.watcher).then_some(self.active_at + IDLE_TIMEOUT)
    }

    /// Nothing more will come from it, nor go to it.
    fn done(&self) -> bool {
        !self.held && self.eof && !self.client.has_line() && !self.client.output_pending()
    }
}

/// The set of control clients, in fixed slots (a slot number is the epoll token
/// offset and what `Loop::execute` names the asking client by).
pub(super) struct Clients {
    slots: Vec<Option<Slot>>,
    /// The slot each turn starts from moves on by one every turn.
    cursor: usize,
    /// Whether epoll watches the listener (not while every slot is taken).
    accepting: bool,
}

impl Clients {
    pub(super) fn new() -> Clients {
        Clients {
            slots: (0..MAX_CLIENTS).map(|_| None).collect(),
            cursor: 0,
            accepting: false,
        }
    }

    pub(super) fn full(&self) -> bool {
        self.slots.iter().all(Option::is_some)
    }

    /// Takes a slot for a new connection, sending `greeting` first if not empty.
    /// Returns the slot, or `None` if there is none free or the client is gone.
    pub(super) fn adopt(
        &mut self,
        epoll: &Epoll,
        stream: UnixStream,
        greeting: &str,
        now: Instant,
    ) -> Option<usize> {
        let slot = self.slots.iter().position(Option::is_none)?;
        let mut client = Client::new(stream).ok()?;
        client.reply(greeting).ok()?;
        self.slots[slot] = Some(Slot {
            client,
            active_at: now,
            eof: false,
            held: false,
            watched: None,
            watcher: false,
        });
        self.watch(epoll, slot);
        self.slots[slot].as_ref().map(|_| slot)
    }

    /// Handles epoll readiness of `slot`: flushes pending replies, or reads one
    /// chunk of input.
    pub(super) fn event(&mut self, epoll: &Epoll, slot: usize, now: Instant) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        if s.client.output_pending() {
            match s.client.flush() {
                Ok(0) => {}
                Ok(_) => s.active_at = now,
                Err(_) => return self.close(epoll, slot),
            }
        } else if !s.held && !s.eof && !s.client.has_line() {
            match s.client.fill() {
                Input::Bytes => s.active_at = now,
                Input::Nothing => {}
                // A watcher's peer is gone: nobody reads its events any more.
                Input::Closed if s.watcher => return self.close(epoll, slot),
                Input::Closed => s.eof = true,
            }
            if s.watcher {
                s.client.clear_input();
            }
        }
        self.watch(epoll, slot);
    }

    /// Makes `slot` a watcher (`events`), unless `MAX_WATCHERS` are already.
    pub(super) fn add_watcher(&mut self, epoll: &Epoll, slot: usize) -> Result<(), String> {
        if self.watchers().count() >= MAX_WATCHERS {
            return Err(format!(
                "too many event watchers (at most {MAX_WATCHERS} at once)"
            ));
        }
        if let Some(Some(s)) = self.slots.get_mut(slot) {
            s.watcher = true;
            s.client.clear_input();
        }
        self.watch(epoll, slot);
        Ok(())
    }

    /// The slots of the watchers still listening.
    fn watchers(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_ref().is_some_and(|s| s.watcher && !s.eof))
            .map(|(i, _)| i)
    }

    /// Queues one event line for every watcher; one more than
    /// `MAX_WATCHER_BACKLOG` bytes behind, or whose connection broke, is closed.
    pub(super) fn broadcast(&mut self, epoll: &Epoll, line: &str, now: Instant) {
        let watchers: Vec<usize> = self.watchers().collect();
        for slot in watchers {
            let Some(Some(s)) = self.slots.get_mut(slot) else {
                continue;
            };
            match s.client.reply(line) {
                Ok(n) if s.client.output_len() <= MAX_WATCHER_BACKLOG => {
                    if n > 0 {
                        s.active_at = now;
                    }
                    self.watch(epoll, slot);
                }
                Ok(_) => {
                    log::warn!(
                        "control client {slot}: event watcher more than \
                         {MAX_WATCHER_BACKLOG} bytes behind; closing it"
                    );
                    self.close(epoll, slot);
                }
                Err(_) => self.close(epoll, slot),
            }
        }
    }

    /// The watchers' descriptors (at most `MAX_WATCHERS`), for an update to
    /// hand over; `hold` each that goes.
    pub(super) fn watcher_fds(&self) -> Vec<(usize, RawFd)> {
        self.watchers()
            .filter_map(|slot| self.fd(slot).map(|fd| (slot, fd)))
            .collect()
    }

    /// One write of what waits for each watcher, without blocking: before
    /// this process hands them over or ends.
    pub(super) fn flush_watchers(&mut self) {
        for s in self.slots.iter_mut().flatten().filter(|s| s.watcher) {
            let _ = s.client.flush();
        }
    }

    /// The slots with a command to serve this turn, in this turn's order.
    pub(super) fn turn(&mut self) -> Vec<usize> {
        let n = self.slots.len();
        let start = self.cursor;
        self.cursor = (self.cursor + 1) % n;
        (0..n)
            .map(|i| (start + i) % n)
            .filter(|&s| self.slots[s].as_ref().is_some_and(Slot::ready))
            .collect()
    }

    /// The next command line of `slot`, if it is to be served now.
    pub(super) fn next_line(&mut self, slot: usize) -> Option<Line> {
        match self.slots.get_mut(slot) {
            Some(Some(s)) if s.ready() => s.client.next_line(),
            _ => None,
        }
    }

    /// Sends one reply line to `slot`; a broken connection is closed.
    pub(super) fn reply(&mut self, epoll: &Epoll, slot: usize, text: &str, now: Instant) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        if s.client.reply(text).is_err() {
            return self.close(epoll, slot);
        }
        s.active_at = now;
        self.watch(epoll, slot);
    }

    /// Stops reading from and serving `slot` (its descriptor stays open, its
    /// input buffered) until `release`, for an operation that answers it later.
    pub(super) fn hold(&mut self, epoll: &Epoll, slot: usize) {
        if let Some(Some(s)) = self.slots.get_mut(slot) {
            s.held = true;
            self.watch(epoll, slot);
        }
    }

    /// Ends `hold`: the client is read and served again, and idle from `now`.
    pub(super) fn release(&mut self, epoll: &Epoll, slot: usize, now: Instant) {
        if let Some(Some(s)) = self.slots.get_mut(slot) {
            s.held = false;
            s.active_at = now;
            self.watch(epoll, slot);
        }
    }

    /// The descriptor of `slot`'s connection, for a CPR mode to hand over.
    pub(super) fn fd(&self, slot: usize) -> Option<RawFd> {
        match self.slots.get(slot) {
            Some(Some(s)) => Some(s.client.stream.as_raw_fd()),
            _ => None,
        }
    }

    /// Closes the clients that are finished or idle since `IDLE_TIMEOUT`.
    pub(super) fn expire(&mut self, epoll: &Epoll, now: Instant) {
        for slot in 0..self.slots.len() {
            let expired = self.slots[slot]
                .as_ref()
                .is_some_and(|s| s.done() || s.deadline().is_some_and(|d| d <= now));
            if expired {
                self.close(epoll, slot);
            }
        }
    }

    /// How long the main loop may sleep in epoll for the clients' sake, in ms
    /// (-1: for ever): not at all while a command waits, else until the
    /// earliest idle deadline.
    pub(super) fn timeout_ms(&self, now: Instant) -> i32 {
        let live = self.slots.iter().flatten();
        if live.clone().any(Slot::ready) {
            return 0;
        }
        match live.filter_map(Slot::deadline).min() {
            None => -1,
            Some(d) => {
                let ms = d
                    .saturating_duration_since(now)
                    .as_nanos()
                    .div_ceil(1_000_000);
                i32::try_from(ms).unwrap_or(i32::MAX)
            }
        }
    }

    /// Watches `listener` only while a slot is free.
    pub(super) fn watch_listener(&mut self, epoll: &Epoll, listener: RawFd) -> std::io::Result<()> {
        let want = !self.full();
        if want != self.accepting {
            let op = if want {
                ControlOperation::Add
            } else {
                ControlOperation::Delete
            };
            epoll.ctl(
                op,
                listener,
                EpollEvent::new(EventSet::IN, Token::Listener.encode()),
            )?;
            self.accepting = want;
        }
        Ok(())
    }

    /// Brings epoll's interest in `slot` in line with its state; a client epoll
    /// refuses cannot be served and is closed.
    fn watch(&mut self, epoll: &Epoll, slot: usize) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        let want = s.wanted();
        if want == s.watched {
            return;
        }
        let fd = s.client.stream.as_raw_fd();
        let token = Token::Client(slot).encode();
        let result = match (s.watched, want) {
            (_, None) => epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
            (None, Some(events)) => {
                epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
            }
            (Some(_), Some(events)) => {
                epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
            }
        };
        match result {
            Ok(()) => s.watched = want,
            Err(e) => {
                log::warn!("control client {slot}: epoll_ctl: {e}; closing it");
                self.close(epoll, slot);
            }
        }
    }

    fn close(&mut self, epoll: &Epoll, slot: usize) {
        if let Some(Some(s)) = self
            .slots
            .get_mut(slot)
            .filter(|s| s.as_ref().is_some_and(|s| s.held))
        {
            // Its descriptor may be on its way to another process (the update
            // it waits for hands it over): it stays open, unwatched, until the
            // update ends and `release` lets it close.
            if s.watched.take().is_some() {
                let fd = s.client.stream.as_raw_fd();
                let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            s.eof = true;
            if s.watcher {
                // Dropped: no more events are queued for it here.
                s.client.clear_output();
            }
            return;
        }
        if let Some(s) = self.slots[slot].take() {
            if s.watched.is_some() {
                // The descriptor may live on in another process (a transfer that
                // failed late): closing it here alone would not unregister it.
                let fd = s.client.stream.as_raw_fd();
                let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
    }
}

impl Loop {
    /// Accepts waiting connections while slots are free; the others wait in the
    /// listen backlog until one frees.
    pub(super) fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        while !self.clients.full() {
            let Ok((stream, _)) = listener.accept() else {
                break;
            };
            if let Err(e) = control::check_peer(&stream) {
                log::warn!("{e}");
                // Best effort: the peer learns why, unless its socket is full.
                let _ = stream.set_nonblocking(true);
                let _ = (&stream).write_all(format!("error: {e}\n").as_bytes());
                continue;
            }
            self.clients.adopt(&self.epoll, stream, "", Instant::now());
        }
        self.watch_listener();
    }

    /// Serves a client handed over by a CPR mode; `greeting` is sent first.
    pub(super) fn adopt_client(&mut self, stream: UnixStream, greeting: &str) {
        self.clients
            .adopt(&self.epoll, stream, greeting, Instant::now());
    }

    /// Serves an event watcher handed over by a CPR mode.
    pub(super) fn adopt_watcher(&mut self, stream: UnixStream) {
        if let Some(slot) = self.clients.adopt(&self.epoll, stream, "", Instant::now()) {
            // The old process admitted at most as many as one may have.
            let _ = self.clients.add_watcher(&self.epoll, slot);
        }
    }

    pub(super) fn watch_listener(&mut self) {
        if let Some(l) = &self.listener {
            if let Err(e) = self.clients.watch_listener(&self.epoll, l.as_raw_fd()) {
                log::warn!("control socket: epoll_ctl: {e}");
            }
        }
    }

    /// One turn: at most one command per client, then idle clients are closed
    /// and the listener watched again if a slot freed.
    pub(super) fn serve_clients(&mut self) -> Next {
        for slot in self.clients.turn() {
            let Some(line) = self.clients.next_line(slot) else {
                continue;
            };
            let (reply, stop) = match line {
                Line::TooLong => (
                    format!(
                        "error: command line too long (more than {} bytes)",
                        control::MAX_LINE
                    ),
                    None,
                ),
                Line::Text(text) => match control::parse(&text) {
                    Ok(cmd) => self.execute(cmd, slot),
                    Err(why) => (format!("error: {why}"), None),
                },
            };
            self.clients
                .reply(&self.epoll, slot, &reply, Instant::now());
            if let Some(outcome) = stop {
                return Next::Stop(outcome);
            }
        }
        self.clients.expire(&self.epoll, Instant::now());
        self.watch_listener();
        Next::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Duration;

    /// A client set with its own epoll, driven as the main loop drives it but
    /// with the clock given by the test.
    struct Harness {
        epoll: Epoll,
        clients: Clients,
    }

    impl Harness {
        fn new() -> Harness {
            Harness {
                epoll: Epoll::new().unwrap(),
                clients: Clients::new(),
            }
        }

        /// Connects a new client; returns its slot and the peer's end.
        fn connect(&mut self, now: Instant) -> (usize, UnixStream) {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let slot = self.clients.adopt(&self.epoll, ours, "", now).unwrap();
            (slot, theirs)
        }

        /// One turn of the main loop at `now`, without sleeping: readiness
        /// events, then the commands served (each answered `ok <line>`).
        fn turn(&mut self, now: Instant) -> Vec<(usize, String)> {
            let mut events = vec![EpollEvent::default(); 2 * MAX_CLIENTS];
            let n = self.epoll.wait(0, &mut events).unwrap();
            for ev in &events[..n] {
                let Some(Token::Client(slot)) = Token::decode(ev.data()) else {
                    panic!("not a client's event: {:#x}", ev.data());
                };
                self.clients.event(&self.epoll, slot, now);
            }
            let mut served = Vec::new();
            for slot in self.clients.turn() {
                if let Some(Line::Text(text)) = self.clients.next_line(slot) {
                    self.clients
                        .reply(&self.epoll, slot, &format!("ok {text}"), now);
                    served.push((slot, text));
                }
            }
            self.clients.expire(&self.epoll, now);
            served
        }

        fn open(&self, slot: usize) -> bool {
            self.clients.fd(slot).is_some()
        }
    }

    fn send(peer: &mut UnixStream, bytes: &[u8]) {
        peer.write_all(bytes).unwrap();
    }

    #[test]
    fn slots_fill_the_listener_pauses_and_resumes() {
        let mut h = Harness::new();
        let t = Instant::now();
        // A readable descriptor stands in for a listener with connections waiting.
        let (listener, mut waiting) = UnixStream::pair().unwrap();
        send(&mut waiting, b"x");
        let listener_fd = listener.as_raw_fd();
        h.clients.watch_listener(&h.epoll, listener_fd).unwrap();
        let listener_reported = |h: &Harness| {
            let mut events = vec![EpollEvent::default(); 2 * MAX_CLIENTS];
            let n = h.epoll.wait(0, &mut events).unwrap();
            events[..n]
                .iter()
                .any(|e| e.data() == Token::Listener.encode())
        };
        assert!(listener_reported(&h));

        let mut peers: Vec<_> = (0..MAX_CLIENTS).map(|_| h.connect(t)).collect();
        assert!(h.clients.full());
        let (extra, _extra_peer) = UnixStream::pair().unwrap();
        assert_eq!(h.clients.adopt(&h.epoll, extra, "", t), None);
        h.clients.watch_listener(&h.epoll, listener_fd).unwrap();
        assert!(
            !listener_reported(&h),
            "a full set must not watch the listener"
        );

        let (slot, peer) = peers.remove(7);
        drop(peer);
        h.turn(t);
        assert!(!h.open(slot), "a client that hung up is closed");
        assert!(!h.clients.full());
        h.clients.watch_listener(&h.epoll, listener_fd).unwrap();
        assert!(listener_reported(&h), "a freed slot resumes accepting");
        assert_eq!(h.connect(t).0, slot, "the freed slot is reused");
    }

    #[test]
    fn an_idle_client_is_closed_after_the_timeout() {
        let mut h = Harness::new();
        let t0 = Instant::now();
        let (idle, mut idle_peer) = h.connect(t0);
        let (busy, mut busy_peer) = h.connect(t0);
        assert_eq!(
            h.clients.timeout_ms(t0),
            IDLE_TIMEOUT.as_millis() as i32,
            "the loop sleeps until the first deadline"
        );

        // Part of a line is activity too.
        let t1 = t0 + IDLE_TIMEOUT / 2;
        send(&mut busy_peer, b"sta");
        h.turn(t1);
        let t2 = t0 + IDLE_TIMEOUT - Duration::from_millis(1);
        assert!(h.turn(t2).is_empty());
        assert!(h.open(idle) && h.open(busy));
        assert_eq!(h.clients.timeout_ms(t2), 1);

        h.turn(t0 + IDLE_TIMEOUT);
        assert!(!h.open(idle), "idle for IDLE_TIMEOUT: closed");
        assert!(h.open(busy), "sent part of a line since: kept");
        idle_peer.set_nonblocking(true).unwrap();
        assert_eq!(
            idle_peer.read(&mut [0u8; 8]).unwrap(),
            0,
            "the peer sees EOF"
        );

        send(&mut busy_peer, b"tus\n");
        let t3 = t1 + IDLE_TIMEOUT - Duration::from_millis(1);
        assert_eq!(h.turn(t3), vec![(busy, "status".to_string())]);
        // Its reply restarted the clock.
        h.turn(t1 + IDLE_TIMEOUT);
        assert!(h.open(busy));
        h.turn(t3 + IDLE_TIMEOUT);
        assert!(!h.open(busy));
        assert_eq!(h.clients.timeout_ms(t3), -1, "no client, no deadline");
    }

    #[test]
    fn a_pipelining_client_gets_one_command_per_turn() {
        let mut h = Harness::new();
        let t = Instant::now();
        let (flooder, mut flood_peer) = h.connect(t);
        let (single, mut single_peer) = h.connect(t);
        send(&mut flood_peer, &b"status\n".repeat(1000));
        let early = h.turn(t).len();
        assert_eq!(h.clients.timeout_ms(t), 0, "a buffered line: no sleeping");
        {
            let s = h.clients.slots[flooder].as_ref().unwrap();
            assert_eq!(s.watched, None, "not read while it has lines buffered");
        }
        send(&mut single_peer, b"status\n");
        let mut flooder_served = 0;
        let mut single_served = false;
        for _ in 0..5 {
            for (slot, _) in h.turn(t) {
                if slot == single {
                    single_served = true;
                } else {
                    flooder_served += 1;
                }
            }
            // Replies are read as they come, so none wait in molt.
            let mut buf = [0u8; 65536];
            flood_peer.set_nonblocking(true).unwrap();
            while flood_peer.read(&mut buf).is_ok() {}
            if single_served {
                break;
            }
        }
        assert!(single_served, "the single command was never served");
        assert!(
            flooder_served <= 2,
            "{flooder_served} of the pipeliner's commands went first"
        );
        let mut served = early + flooder_served;
        for _ in 0..2000 {
            served += h.turn(t).len();
            let mut buf = [0u8; 65536];
            while flood_peer.read(&mut buf).is_ok() {}
        }
        assert_eq!(served, 1000, "every pipelined command is served once");
    }

    #[test]
    fn turns_rotate_their_first_slot() {
        let mut h = Harness::new();
        let t = Instant::now();
        let mut peers: Vec<_> = (0..3).map(|_| h.connect(t)).collect();
        for (_, p) in &mut peers {
            send(p, &b"status\n".repeat(3));
        }
        let firsts: Vec<usize> = (0..3).map(|_| h.turn(t)[0].0).collect();
        let mut sorted = firsts.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 3, "first served per turn: {firsts:?}");
    }

    #[test]
    fn a_held_client_is_not_read_served_or_timed_out_until_released() {
        let mut h = Harness::new();
        let t0 = Instant::now();
        let (slot, mut peer) = h.connect(t0);
        h.clients.hold(&h.epoll, slot);
        send(&mut peer, b"status\n");
        assert!(h.turn(t0).is_empty());
        let watched = h.clients.slots[slot].as_ref().unwrap().watched;
        assert_eq!(watched, None, "a held client is not read from");
        assert_eq!(
            h.clients.timeout_ms(t0),
            -1,
            "a held client has no deadline"
        );
        let late = t0 + 3 * IDLE_TIMEOUT;
        assert!(h.turn(late).is_empty());
        assert!(h.open(slot), "held: never idle");
        // The integrator's operation answers it while held.
        h.clients.reply(&h.epoll, slot, "ok done", late);
        let mut reply = [0u8; 8];
        peer.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"ok done\n");

        h.clients.release(&h.epoll, slot, late);
        assert_eq!(h.turn(late), vec![(slot, "status".to_string())]);
        h.turn(late + IDLE_TIMEOUT);
        assert!(!h.open(slot), "released: idle again from the release");
    }

    #[test]
    fn watchers_get_events_are_never_idle_and_are_bounded_in_number() {
        let mut h = Harness::new();
        let t0 = Instant::now();
        let (w, mut w_peer) = h.connect(t0);
        let (plain, _plain_peer) = h.connect(t0);
        h.clients.add_watcher(&h.epoll, w).unwrap();
        // Input after `events` is read and dropped, never served.
        send(&mut w_peer, b"status\n");
        assert!(h.turn(t0).is_empty());
        h.clients.broadcast(&h.epoll, "event one", t0);
        let mut got = [0u8; 10];
        w_peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"event one\n", "only watchers get events");
        let late = t0 + 3 * IDLE_TIMEOUT;
        h.turn(late);
        assert!(h.open(w), "a watcher is not closed as idle");
        assert!(!h.open(plain), "a plain client is");
        assert_eq!(h.clients.timeout_ms(late), -1, "a watcher has no deadline");

        let mut peers = Vec::new();
        for _ in 1..MAX_WATCHERS {
            let (slot, peer) = h.connect(late);
            h.clients.add_watcher(&h.epoll, slot).unwrap();
            peers.push(peer);
        }
        let (one_more, _peer) = h.connect(late);
        let e = h.clients.add_watcher(&h.epoll, one_more).unwrap_err();
        assert!(e.contains(&MAX_WATCHERS.to_string()), "{e}");
        assert_eq!(h.clients.watcher_fds().len(), MAX_WATCHERS);

        // A watcher that hangs up frees its place.
        drop(w_peer);
        h.turn(late);
        assert!(!h.open(w));
        h.clients.add_watcher(&h.epoll, one_more).unwrap();
    }

    #[test]
    fn a_watcher_that_does_not_read_is_dropped_past_its_backlog() {
        let mut h = Harness::new();
        let t0 = Instant::now();
        let (deaf, _deaf_peer) = h.connect(t0);
        let (reader, mut reader_peer) = h.connect(t0);
        let (other, mut other_peer) = h.connect(t0);
        h.clients.add_watcher(&h.epoll, deaf).unwrap();
        h.clients.add_watcher(&h.epoll, reader).unwrap();
        reader_peer.set_nonblocking(true).unwrap();
        let line = format!("event {}", "x".repeat(100));
        let mut sent = 0;
        let mut received = 0;
        let mut buf = vec![0u8; 1 << 16];
        while h.open(deaf) {
            h.clients.broadcast(&h.epoll, &line, t0);
            sent += line.len() + 1;
            let queued = h.clients.slots[deaf]
                .as_ref()
                .map_or(0, |s| s.client.output_len());
            assert!(queued <= MAX_WATCHER_BACKLOG, "{queued} bytes queued");
            while let Ok(n) = reader_peer.read(&mut buf) {
                received += n;
            }
            h.turn(t0);
            assert!(sent < 64 << 20, "the deaf watcher was never dropped");
        }
        assert!(sent > MAX_WATCHER_BACKLOG);
        // The one that reads got every line, the other client is served.
        h.turn(t0);
        while let Ok(n) = reader_peer.read(&mut buf) {
            received += n;
        }
        assert_eq!(received, sent);
        send(&mut other_peer, b"status\n");
        assert_eq!(h.turn(t0), vec![(other, "status".to_string())]);
    }

    #[test]
    fn a_held_watcher_stays_open_when_dropped_until_released() {
        let mut h = Harness::new();
        let t0 = Instant::now();
        let (w, w_peer) = h.connect(t0);
        h.clients.add_watcher(&h.epoll, w).unwrap();
        let fds = h.clients.watcher_fds();
        assert_eq!(fds.len(), 1);
        h.clients.hold(&h.epoll, w);
        // Its peer goes while an update holds it (its descriptor is handed over).
        drop(w_peer);
        h.clients.broadcast(&h.epoll, "event x", t0);
        h.turn(t0);
        assert_eq!(
            h.clients.fd(w),
            Some(fds[0].1),
            "held: the descriptor stays"
        );
        h.clients.release(&h.epoll, w, t0);
        h.clients.broadcast(&h.epoll, "event y", t0);
        h.turn(t0);
        assert!(!h.open(w), "released: closed");
    }

    #[test]
    fn a_client_that_does_not_read_waits_and_others_are_served() {
        let mut h = Harness::new();
        let t0 = Instant::now();
        let (deaf, mut deaf_peer) = h.connect(t0);
        let (other, mut other_peer) = h.connect(t0);
        let big = "x".repeat(4096);
        while !h.clients.slots[deaf]
            .as_ref()
            .unwrap()
            .client
            .output_pending()
        {
            h.clients.reply(&h.epoll, deaf, &big, t0);
        }
        send(&mut deaf_peer, b"status\n");
        send(&mut other_peer, b"status\n");
        assert_eq!(h.turn(t0), vec![(other, "status".to_string())]);
        assert!(h.turn(t0).is_empty(), "its command waits for its replies");
        h.turn(t0 + IDLE_TIMEOUT);
        assert!(!h.open(deaf), "never reading: closed as idle");
    }
}
