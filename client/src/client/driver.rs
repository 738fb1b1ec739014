//! The background driver of a [`Client`](super::Client): one task per
//! client that owns the connection, the outbox, the cursors and the
//! reordering, reconnects with backoff and hands events to the application.

use super::*;

pub(super) struct Driver {
    pub(super) cfg: ClientConfig,
    pub(super) send_retry: BackoffConfig,
    pub(super) profile: Profile,
    pub(super) creds: Credentials,
    pub(super) cursors: CursorStore,
    pub(super) outbox: Outbox,
    pub(super) reorder: Reorder,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) state: watch::Sender<ConnState>,
    pub(super) cmd_rx: mpsc::Receiver<Command>,
    pub(super) internal_tx: mpsc::Sender<Internal>,
    pub(super) internal_rx: mpsc::Receiver<Internal>,
    /// Incremented per connection; results of older connections are stale.
    pub(super) epoch: u64,
    /// Outbox entries with a Send outstanding on the current connection.
    pub(super) in_flight: HashSet<ClientMsgId>,
    /// Outbox entries queued by this process and never written to a connection: their first
    /// Send says `first_attempt` (the server then skips its durable dedup lookup). Entries
    /// reloaded from disk are never here, so after a restart every resend is a plain retry.
    pub(super) fresh: HashSet<ClientMsgId>,
    /// Per-message retry backoff after transient refusals.
    pub(super) retries: HashMap<ClientMsgId, Backoff>,
    /// Callers of `Client::send` waiting for the outcome of their message.
    pub(super) waiters: HashMap<ClientMsgId, oneshot::Sender<Result<v1::SendAck, ClientError>>>,
    /// The Sync finished (counts), waiting for gap fetches before `Synced`.
    pub(super) sync_done: Option<(u32, u32)>,
    /// Presence subscriptions and state to restore on each connection.
    pub(super) sticky: Arc<Mutex<Sticky>>,
}

impl Driver {
    pub(super) async fn run(mut self) {
        let mut backoff = Backoff::new(self.cfg.backoff);
        loop {
            self.epoch += 1;
            let end = match self.connect().await {
                Ok((conn, pushes, welcome)) => {
                    backoff.reset();
                    let end = self.session(&conn, pushes, &welcome).await;
                    conn.close();
                    end
                }
                Err(ClientError::SessionLost(reason)) => SessionEnd::SessionLost(reason),
                Err(e) => SessionEnd::Lost {
                    reason: e.to_string(),
                    reconnect_after: Duration::ZERO,
                },
            };
            self.in_flight.clear();
            self.reorder.handle_disconnect();
            self.sync_done = None;
            match end {
                SessionEnd::Shutdown => {
                    self.stop("client shut down".to_owned());
                    return;
                }
                SessionEnd::SessionLost(reason) => {
                    self.emit(Event::LoggedOut {
                        reason: reason.clone(),
                    })
                    .await;
                    self.stop(reason);
                    return;
                }
                SessionEnd::Lost {
                    reason,
                    reconnect_after,
                } => {
                    let delay = backoff.next_delay().max(reconnect_after);
                    self.state.send_replace(ConnState::Connecting {
                        last_error: Some(reason.clone()),
                    });
                    self.emit(Event::Disconnected {
                        reason,
                        retry_in: delay,
                    })
                    .await;
                    if !self.wait_offline(delay).await {
                        self.stop("client shut down".to_owned());
                        return;
                    }
                }
            }
        }
    }

    fn stop(&mut self, reason: String) {
        for (_, w) in self.waiters.drain() {
            let _ = w.send(Err(ClientError::Stopped));
        }
        self.state.send_replace(ConnState::Stopped(reason));
    }

    /// Sleeps `delay` while still queueing sends. False: shut down.
    async fn wait_offline(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return true,
                cmd = self.cmd_rx.recv() => match cmd {
                    None | Some(Command::Shutdown) => return false,
                    Some(Command::Send { entry, reply }) => {
                        self.enqueue(entry, reply);
                    }
                    Some(Command::Reconnect(_)) => {}
                },
            }
        }
    }

    /// Connects and authenticates: Hello with the access token unless it is
    /// about to expire; if the server refused it (`Welcome.auth_error`) or it
    /// was not sent, Refresh on the same connection, whose `SessionGranted`
    /// authenticates it (no second Hello). A refused refresh ends the
    /// session.
    async fn connect(&mut self) -> Result<(Connection, Pushes, v1::Welcome), ClientError> {
        let (conn, pushes) = Connection::connect(&self.cfg.connect).await?;
        let token = (self.creds.access_expires_at_ms > unix_ms() + TOKEN_MARGIN_MS)
            .then(|| self.creds.access_token.clone());
        let w = conn.hello(token.as_deref()).await?;
        if w.authenticated.is_none() {
            self.refresh(&conn).await?;
        }
        Ok((conn, pushes, w))
    }

    async fn refresh(&mut self, conn: &Connection) -> Result<(), ClientError> {
        let req = Body::Refresh(v1::Refresh {
            refresh_token: self.creds.refresh_token.clone(),
        });
        match conn.request(req).await {
            Ok(Body::SessionGranted(g)) => {
                self.creds = Credentials::from(&g);
                self.profile.save_credentials(&self.creds)?;
                Ok(())
            }
            Ok(other) => Err(ClientError::unexpected("SessionGranted", Some(&other))),
            Err(ClientError::Server(e)) if !e.is_transient() => Err(ClientError::SessionLost(
                format!("token refresh refused: {e}"),
            )),
            Err(e) => Err(e),
        }
    }

    async fn session(
        &mut self,
        conn: &Connection,
        mut pushes: Pushes,
        welcome: &v1::Welcome,
    ) -> SessionEnd {
        self.state.send_replace(ConnState::Up(conn.clone()));
        self.emit(Event::Connected {
            user_id: self.creds.user_id,
            device_id: self.creds.device_id,
            server_version: welcome.server_version.clone(),
            features: welcome.features.clone(),
        })
        .await;
        self.restore(conn);
        let queued: Vec<ClientMsgId> = self
            .outbox
            .entries()
            .iter()
            .map(|e| e.client_msg_id)
            .collect();
        for id in queued {
            self.transmit_send(conn, id);
        }
        if self.cfg.receive_messages {
            self.start_sync(conn).await;
            for range in self.reorder.open_gaps() {
                self.fetch(conn, range);
            }
        }
        let mut reconnect_after = Duration::ZERO;
        loop {
            tokio::select! {
                push = pushes.recv() => match push {
                    None => {
                        return SessionEnd::Lost {
                            reason: conn.close_reason().unwrap_or_else(|| "connection closed".into()),
                            reconnect_after,
                        };
                    }
                    Some(frame) => {
                        if let Some(end) = self.handle_push(conn, frame, &mut reconnect_after).await {
                            return end;
                        }
                    }
                },
                cmd = self.cmd_rx.recv() => match cmd {
                    None | Some(Command::Shutdown) => return SessionEnd::Shutdown,
                    Some(Command::Send { entry, reply }) => {
                        let id = entry.client_msg_id;
                        if self.enqueue(entry, reply) {
                            self.transmit_send(conn, id);
                        }
                    }
                    Some(Command::Reconnect(reason)) => {
                        return SessionEnd::Lost { reason, reconnect_after: Duration::ZERO };
                    }
                },
                Some(int) = self.internal_rx.recv() => {
                    if let Some(end) = self.handle_internal(conn, int).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Re-subscribes to presence and sets it again on a new connection (in
    /// the background); the snapshots become [`Event::Presence`] events.
    fn restore(&self, conn: &Connection) {
        let requests = {
            let sticky = self
                .sticky
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            presence::restore_requests(&sticky)
        };
        if requests.is_empty() {
            return;
        }
        let conn = conn.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            for body in requests {
                let res = tokio::time::timeout(presence::RESTORE_WAIT, conn.request(body)).await;
                let event = match res {
                    Ok(Ok(Body::PresenceSnapshot(s))) => {
                        for p in s.users {
                            let _ = events.send(Event::Presence(p)).await;
                        }
                        continue;
                    }
                    Ok(Ok(_)) => continue,
                    Ok(Err(ClientError::Server(e))) => Event::ServerError(e),
                    // The connection is going; the next one tries again.
                    Ok(Err(_)) | Err(_) => return,
                };
                let _ = events.send(event).await;
            }
        });
    }

    async fn start_sync(&mut self, conn: &Connection) {
        let last_seq = self.cursors.all().iter().map(|(c, s)| (*c, *s)).collect();
        let Ok(mut stream) = conn.request_stream(Body::Sync(v1::Sync { last_seq })).await else {
            return; // The connection is closing; the session loop sees it.
        };
        let tx = self.internal_tx.clone();
        let epoch = self.epoch;
        tokio::spawn(async move {
            loop {
                match stream.next().await {
                    Ok(Some(frame)) => {
                        if tx.send(Internal::Sync { epoch, frame }).await.is_err() {
                            return;
                        }
                    }
                    // Closed: the session loop sees the connection end.
                    Ok(None) | Err(_) => return,
                }
            }
        });
    }

    /// Puts a new message into the outbox. False if it could not be stored
    /// (the caller was told).
    fn enqueue(
        &mut self,
        entry: OutboxEntry,
        reply: oneshot::Sender<Result<v1::SendAck, ClientError>>,
    ) -> bool {
        let id = entry.client_msg_id;
        if let Err(e) = self.outbox.push(entry) {
            let _ = reply.send(Err(e));
            return false;
        }
        self.waiters.insert(id, reply);
        self.fresh.insert(id);
        true
    }

    fn transmit_send(&mut self, conn: &Connection, id: ClientMsgId) {
        if self.in_flight.contains(&id) {
            return;
        }
        let Some(entry) = self.outbox.find(&id) else {
            return;
        };
        let mut send = entry.to_send();
        // Marked before the bytes leave: if this write is lost, the resend is a retry.
        send.first_attempt = self.fresh.remove(&id);
        let body = Body::Send(send);
        self.in_flight.insert(id);
        let conn = conn.clone();
        let tx = self.internal_tx.clone();
        let epoch = self.epoch;
        tokio::spawn(async move {
            let result = conn.request(body).await;
            let _ = tx.send(Internal::SendResult { epoch, id, result }).await;
        });
    }

    fn fetch(&mut self, conn: &Connection, range: FetchRange) {
        let req = Body::GetHistory(v1::GetHistory {
            conversation_id: range.conversation_id,
            anchor: Some(v1::get_history::Anchor::AfterSeq(range.after_seq)),
            limit: range.limit(),
        });
        let conn = conn.clone();
        let tx = self.internal_tx.clone();
        let epoch = self.epoch;
        tokio::spawn(async move {
            let result = conn.request(req).await;
            let _ = tx
                .send(Internal::Page {
                    epoch,
                    range,
                    result,
                })
                .await;
        });
    }

    async fn handle_push(
        &mut self,
        conn: &Connection,
        frame: v1::Frame,
        reconnect_after: &mut Duration,
    ) -> Option<SessionEnd> {
        match frame.body? {
            Body::Goodbye(g) => {
                *reconnect_after = Duration::from_millis(g.reconnect_after_ms.into());
                let e = ServerError {
                    code_num: g.code,
                    message: g.message,
                    retry_after_ms: g.reconnect_after_ms,
                };
                if e.is_session_lost() {
                    return Some(SessionEnd::SessionLost(format!("server said goodbye: {e}")));
                }
                None
            }
            Body::Error(e) => {
                let e = ServerError::from(e);
                if e.code() == ErrorCode::TokenExpired {
                    return Some(SessionEnd::Lost {
                        reason: "access token expired".to_owned(),
                        reconnect_after: Duration::ZERO,
                    });
                }
                if e.is_session_lost() {
                    return Some(SessionEnd::SessionLost(e.to_string()));
                }
                self.emit(Event::ServerError(e)).await;
                None
            }
            body => {
                self.handle_message_frame(conn, body).await;
                None
            }
        }
    }

    /// Frames that can come as pushes or inside a Sync.
    async fn handle_message_frame(&mut self, conn: &Connection, body: Body) {
        match body {
            Body::Deliver(d) => {
                if let (true, Some(m)) = (self.cfg.receive_messages, d.message) {
                    let released = self.reorder.handle_message(m);
                    self.accept(conn, released).await;
                }
            }
            Body::Receipt(r) => self.emit(Event::Receipt(r)).await,
            Body::GroupReceipts(g) => self.emit(Event::GroupReceipts(g)).await,
            Body::MessagesAvailable(a) => {
                if self.cfg.receive_messages
                    && let Some(range) = self
                        .reorder
                        .handle_available(a.conversation_id, a.up_to_seq)
                {
                    self.fetch(conn, range);
                }
            }
            Body::SendAck(ack) => {
                // An answer that lost its request (our other devices get our
                // messages as Deliver): either way that seq exists.
                if let Some(id) = ClientMsgId::from_bytes(&ack.client_msg_id)
                    && self.outbox.find(&id).is_some()
                {
                    self.on_ack(conn, id, ack).await;
                } else if self.cfg.receive_messages
                    && let Some(range) = self.reorder.handle_available(ack.conversation_id, ack.seq)
                {
                    self.fetch(conn, range);
                }
            }
            Body::Typing(t) => self.emit(Event::Typing(t)).await,
            Body::PresenceUpdate(p) => self.emit(Event::Presence(p)).await,
            Body::PrekeyCount(c) => self.emit(Event::PrekeyCount(c.one_time_prekeys)).await,
            Body::DeviceListChanged(d) => self.emit(Event::DeviceListChanged(d)).await,
            _ => {}
        }
    }

    async fn handle_internal(&mut self, conn: &Connection, int: Internal) -> Option<SessionEnd> {
        match int {
            Internal::SendResult { epoch, id, result } => {
                if epoch == self.epoch {
                    self.in_flight.remove(&id);
                }
                return self.on_send_result(conn, epoch, id, result).await;
            }
            Internal::RetrySend { epoch, id } => {
                if epoch == self.epoch {
                    self.transmit_send(conn, id);
                }
            }
            Internal::Sync { epoch, frame } if epoch == self.epoch => match frame.body {
                Some(Body::SyncDone(done)) => {
                    for t in &done.truncated {
                        if let Some(range) = self
                            .reorder
                            .handle_available(t.conversation_id, t.up_to_seq)
                        {
                            self.fetch(conn, range);
                        }
                    }
                    self.sync_done = Some((done.messages, done.receipts));
                    self.maybe_synced().await;
                }
                Some(Body::Error(e)) => {
                    let e = ServerError::from(e);
                    if e.code() == ErrorCode::TokenExpired {
                        return Some(SessionEnd::Lost {
                            reason: "access token expired".to_owned(),
                            reconnect_after: Duration::ZERO,
                        });
                    }
                    self.emit(Event::SyncFailed(e)).await;
                }
                Some(body) => self.handle_message_frame(conn, body).await,
                None => {}
            },
            Internal::Page {
                epoch,
                range,
                result,
            } if epoch == self.epoch => {
                match result {
                    Ok(Body::HistoryPage(p)) => {
                        let released = self.reorder.handle_page(range.conversation_id, p.messages);
                        self.accept(conn, released).await;
                    }
                    Ok(other) => {
                        self.reorder.handle_fetch_failed(range.conversation_id);
                        let e = ClientError::unexpected("HistoryPage", Some(&other));
                        self.emit(Event::LocalError(e.to_string())).await;
                    }
                    Err(ClientError::Server(e)) => {
                        self.reorder.handle_fetch_failed(range.conversation_id);
                        self.emit(Event::ServerError(e)).await;
                    }
                    Err(_) => self.reorder.handle_fetch_failed(range.conversation_id),
                }
                self.maybe_synced().await;
            }
            Internal::Sync { .. } | Internal::Page { .. } => {}
        }
        None
    }

    async fn on_send_result(
        &mut self,
        conn: &Connection,
        epoch: u64,
        id: ClientMsgId,
        result: Result<Body, ClientError>,
    ) -> Option<SessionEnd> {
        let error = match result {
            Ok(Body::SendAck(ack)) => {
                self.on_ack(conn, id, ack).await;
                return None;
            }
            Ok(other) => ClientError::unexpected("SendAck", Some(&other)),
            Err(e) => e,
        };
        if error.server().map(ServerError::code) == Some(ErrorCode::TokenExpired) {
            // Retried after the reconnect; the caller hears "queued".
            self.tell_waiter(id, Err(still_queued(id, error)));
            return Some(SessionEnd::Lost {
                reason: "access token expired".to_owned(),
                reconnect_after: Duration::ZERO,
            });
        }
        if !error.is_transient() {
            // Refused for good: retrying the same bytes cannot help.
            if let Err(e) = self.outbox.remove(&id) {
                self.emit(Event::LocalError(e.to_string())).await;
            }
            self.retries.remove(&id);
            if let ClientError::Server(e) = &error {
                self.emit(Event::SendFailed {
                    client_msg_id: id,
                    error: e.clone(),
                })
                .await;
            }
            self.tell_waiter(id, Err(error));
            return None;
        }
        let hint = error.server().map_or(Duration::ZERO, |e| {
            Duration::from_millis(e.retry_after_ms.into())
        });
        self.tell_waiter(id, Err(still_queued(id, error)));
        if epoch == self.epoch {
            let cfg = self.send_retry;
            let delay = self
                .retries
                .entry(id)
                .or_insert_with(|| Backoff::new(cfg))
                .next_delay()
                .max(hint);
            let tx = self.internal_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send(Internal::RetrySend { epoch, id }).await;
            });
        }
        None
    }

    async fn on_ack(&mut self, conn: &Connection, id: ClientMsgId, ack: v1::SendAck) {
        self.retries.remove(&id);
        let entry = match self.outbox.remove(&id) {
            Ok(entry) => entry,
            Err(e) => {
                self.emit(Event::LocalError(e.to_string())).await;
                None
            }
        };
        self.tell_waiter(id, Ok(ack.clone()));
        let Some(entry) = entry else {
            return; // A second ack for the same message.
        };
        self.emit(Event::Sent(ack.clone())).await;
        if self.cfg.receive_messages {
            // Our own message takes its place in the conversation's order.
            let own = v1::Message {
                conversation_id: ack.conversation_id,
                seq: ack.seq,
                sender_user_id: self.creds.user_id,
                sender_device_id: self.creds.device_id,
                client_msg_id: ack.client_msg_id.clone(),
                server_ts_ms: ack.server_ts_ms,
                media: entry.media_ref(),
                change: entry.change(),
                timer_changed: entry
                    .set_timer
                    .map(|seconds| Box::new(v1::DisappearingTimer { seconds })),
                expires_at_ms: ack.expires_at_ms,
                content_type: entry.content_type,
                body: entry.body.into(),
                reply_to_seq: entry.reply_to_seq,
                group_changed: None,
                ..v1::Message::default()
            };
            let released = self.reorder.handle_message(own);
            self.accept(conn, released).await;
        }
    }

    fn tell_waiter(&mut self, id: ClientMsgId, result: Result<v1::SendAck, ClientError>) {
        if let Some(w) = self.waiters.remove(&id) {
            let _ = w.send(result);
        }
    }

    /// Hands released messages to the application, then persists the
    /// cursors and acknowledges delivery to the server.
    async fn accept(&mut self, conn: &Connection, released: Released) {
        let mut acked: Vec<(u64, u64)> = Vec::new();
        for m in released.messages {
            let (conv, seq) = (m.conversation_id, m.seq);
            self.emit(Event::from_entry(m)).await;
            self.cursors.advance(conv, seq);
            match acked.iter_mut().find(|(c, _)| *c == conv) {
                Some(a) => a.1 = seq,
                None => acked.push((conv, seq)),
            }
        }
        if !acked.is_empty() {
            if let Err(e) = self.cursors.save() {
                self.emit(Event::LocalError(e.to_string())).await;
            }
            for (conversation_id, up_to_seq) in acked {
                let ack = Body::DeliveryAck(v1::DeliveryAck {
                    conversation_id,
                    up_to_seq,
                });
                let _ = conn.send_oneway(ack).await;
            }
        }
        if let Some(range) = released.fetch {
            self.fetch(conn, range);
        }
    }

    async fn maybe_synced(&mut self) {
        if self.reorder.fetching() {
            return;
        }
        if let Some((messages, receipts)) = self.sync_done.take() {
            self.emit(Event::Synced { messages, receipts }).await;
        }
    }

    async fn emit(&self, event: Event) {
        // The application may have dropped its Events: that is allowed.
        let _ = self.events.send(event).await;
    }
}

fn still_queued(client_msg_id: ClientMsgId, cause: ClientError) -> ClientError {
    ClientError::StillQueued {
        client_msg_id,
        cause: Box::new(cause),
    }
}
