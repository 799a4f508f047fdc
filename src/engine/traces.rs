//! The driver's spans of traced proposals (see [`crate::telemetry`] for which proposals are
//! traced and what each span means).
//!
//! At most [`MAX_TRACED`] proposals are followed at once, in a short vector: every check the
//! driver makes (does this message, this write, this commit carry a traced proposal?) is a scan
//! of it, and an empty one costs the driver one branch per step.

use std::time::{Duration, Instant};

use tracing::Span;

use crate::protocol::{Carriage, Protocol};
use crate::telemetry::{TraceAttachment, TraceContext};
use crate::types::{Entry, LogIndex, NodeId, Payload, ProposalTag};

/// Traced proposals followed at once on one node; more are not traced.
pub(crate) const MAX_TRACED: usize = 64;

/// One traced proposal, as far as this node is concerned.
struct Traced {
    tag: ProposalTag,
    /// On the node whose client proposed it: from the call until it is applied here.
    proposal: Option<Span>,
    /// On the leader: from the moment it is ordered until it is committed.
    commit: Option<Span>,
    /// On a follower: from receiving the entry until it is durable (and acknowledged).
    append: Option<Span>,
    /// Its log index, once this node appended it.
    index: Option<LogIndex>,
    /// Whether its write is durable here.
    persisted: bool,
    /// When this node began following it, to forget proposals that never commit.
    since: Instant,
}

impl Traced {
    fn new(tag: ProposalTag, since: Instant) -> Self {
        Traced {
            tag,
            proposal: None,
            commit: None,
            append: None,
            index: None,
            persisted: false,
            since,
        }
    }

    /// The span a message that carries this proposal names as the receiver's parent: the
    /// leader's commit span, or else the proposal's (on the leader for its own proposals).
    fn outermost_here(&self) -> Option<&Span> {
        self.commit.as_ref().or(self.proposal.as_ref())
    }

    /// The span of this node's part in the proposal, where its events go: the commit span on
    /// a leader, the append span on a follower, else the proposal's.
    fn part_here(&self) -> Option<&Span> {
        [&self.commit, &self.append, &self.proposal]
            .into_iter()
            .flatten()
            .next()
    }

    fn spans(&self) -> impl Iterator<Item = &Span> {
        [&self.proposal, &self.commit, &self.append]
            .into_iter()
            .flatten()
    }
}

/// The traced proposals this node follows.
#[derive(Default)]
pub(crate) struct ProposalTraces {
    traced: Vec<Traced>,
}

impl ProposalTraces {
    /// Whether no traced proposal is followed (the driver then skips every other call).
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.traced.is_empty()
    }

    fn find(&mut self, tag: ProposalTag) -> Option<&mut Traced> {
        self.traced.iter_mut().find(|traced| traced.tag == tag)
    }

    fn follow(&mut self, tag: ProposalTag, now: Instant) -> Option<&mut Traced> {
        if let Some(position) = self.traced.iter().position(|traced| traced.tag == tag) {
            return Some(&mut self.traced[position]);
        }
        if self.traced.len() >= MAX_TRACED {
            return None;
        }
        self.traced.push(Traced::new(tag, now));
        self.traced.last_mut()
    }

    /// A client's proposal on this node, traced by `span`, got request id `tag.request_id`.
    pub(crate) fn proposed(&mut self, tag: ProposalTag, span: Span, now: Instant) {
        span.record("consensus.request_id", tag.request_id);
        if let Some(traced) = self.follow(tag, now) {
            traced.proposal = Some(span);
        }
    }

    /// A peer's message that came with a trace attachment. The attachment counts only if the
    /// message does carry the proposal it names, as what carrying it means to this node.
    pub(crate) fn received<P: Protocol>(
        &mut self,
        from: NodeId,
        message: &P::Message,
        attachment: &TraceAttachment,
        now: Instant,
    ) {
        let mut carried = false;
        let carriage = P::carried_proposals(message, from, &mut |tag| {
            carried |= tag == attachment.tag;
        });
        if !carried {
            return;
        }
        let Some(traced) = self.follow(attachment.tag, now) else {
            return;
        };
        match carriage {
            Carriage::Forwarded if traced.commit.is_none() => {
                let span = tracing::info_span!(
                    target: "consensus::trace",
                    "consensus.commit",
                    consensus.proposer = %attachment.tag.proposer,
                    consensus.request_id = attachment.tag.request_id,
                    consensus.log.index = tracing::field::Empty,
                );
                attachment.context.adopt(&span);
                traced.commit = Some(span);
            }
            Carriage::Entries if traced.append.is_none() && !traced.persisted => {
                let span = tracing::info_span!(
                    target: "consensus::trace",
                    "consensus.append",
                    consensus.leader = %from,
                    consensus.request_id = attachment.tag.request_id,
                    consensus.log.index = tracing::field::Empty,
                );
                attachment.context.adopt(&span);
                traced.append = Some(span);
            }
            _ => {}
        }
    }

    /// The attachment for `message`, sent by this node to `to`, if it carries a traced
    /// proposal. A proposal forwarded to the leader gets a `forwarded` event.
    pub(crate) fn attachment_for<P: Protocol>(
        &self,
        this: NodeId,
        to: NodeId,
        message: &P::Message,
    ) -> Option<TraceAttachment> {
        let mut found = None;
        let carriage = P::carried_proposals(message, this, &mut |tag| {
            if found.is_none() && self.traced.iter().any(|traced| traced.tag == tag) {
                found = Some(tag);
            }
        });
        let tag = found?;
        let traced = self.traced.iter().find(|traced| traced.tag == tag)?;
        if let (Carriage::Forwarded, Some(proposal)) = (carriage, &traced.proposal) {
            proposal.in_scope(
                || tracing::event!(target: "consensus::trace", tracing::Level::INFO, consensus.leader = %to, "forwarded"),
            );
        }
        let context = TraceContext::of_span(traced.outermost_here()?)?;
        Some(TraceAttachment { tag, context })
    }

    /// Entries this node is about to write: a traced one's index is recorded, and an `appended`
    /// event (`consensus.batch.entries`: the write's size) marks when it joined a batch. On the
    /// leader a
    /// forwarded proposal has had its commit span since it arrived; the leader's own proposals
    /// need none (their proposal span is on this node already, and one span less per traced
    /// proposal is what keeps export cheap).
    pub(crate) fn appending(&mut self, entries: &[Entry]) {
        for entry in entries {
            let Payload::Command { tag, .. } = &entry.payload else {
                continue;
            };
            let Some(traced) = self.find(*tag) else {
                continue;
            };
            traced.index = Some(entry.index);
            for span in traced.spans() {
                span.record("consensus.log.index", entry.index);
            }
            if let Some(span) = traced.part_here() {
                span.in_scope(|| {
                    tracing::event!(target: "consensus::trace", tracing::Level::INFO,
                        consensus.batch.entries = entries.len(),
                        "appended"
                    )
                });
            }
        }
    }

    /// The write of everything up to `through` is durable; it took `took`. One `persisted`
    /// event per traced proposal, on the span of this node's part in it.
    pub(crate) fn persisted(&mut self, through: LogIndex, took: Duration) {
        for traced in &mut self.traced {
            if traced.persisted || traced.index.is_none_or(|index| index > through) {
                continue;
            }
            traced.persisted = true;
            if let Some(span) = traced.part_here() {
                span.in_scope(|| {
                    tracing::event!(target: "consensus::trace", tracing::Level::INFO,
                        db.system.name = "fjall",
                        db.operation.name = "persist",
                        db.client.operation.duration_us = took.as_micros() as u64,
                        "persisted"
                    )
                });
            }
        }
    }

    /// PBFT: the batch at `sequence` holding `proposals` is prepared here in `view`. One
    /// `prepared` event per traced proposal in it, on the span of this node's part in it.
    pub(crate) fn prepared(&mut self, view: u64, sequence: u64, proposals: &[ProposalTag]) {
        for traced in &mut self.traced {
            if !proposals.contains(&traced.tag) {
                continue;
            }
            if let Some(span) = traced.part_here() {
                span.in_scope(|| {
                    tracing::event!(target: "consensus::trace", tracing::Level::INFO,
                        consensus.view = view,
                        consensus.sequence = sequence,
                        "prepared"
                    )
                });
            }
        }
    }

    /// The acknowledgements of durable entries went out: their append spans end.
    pub(crate) fn acknowledged(&mut self) {
        for traced in &mut self.traced {
            if traced.persisted {
                traced.append = None;
            }
        }
    }

    /// `committed` are about to be applied: each traced one's spans end (a commit span at its
    /// commit, a proposal span as its client is answered right after this apply, with a
    /// `committed` event between the two), and it is forgotten.
    pub(crate) fn committed(&mut self, committed: &[Entry]) {
        for entry in committed {
            let Payload::Command { tag, .. } = &entry.payload else {
                continue;
            };
            let Some(position) = self.traced.iter().position(|traced| traced.tag == *tag) else {
                continue;
            };
            let traced = self.traced.swap_remove(position);
            if let Some(proposal) = &traced.proposal {
                proposal.in_scope(|| {
                    tracing::event!(target: "consensus::trace", tracing::Level::INFO,
                        consensus.log.index = entry.index,
                        "committed"
                    )
                });
            }
            drop(traced);
        }
    }

    /// Forgets proposals followed for longer than `limit` (lost in a change of leader, or
    /// rejected): their spans end as they are.
    pub(crate) fn expire(&mut self, now: Instant, limit: Duration) {
        self.traced
            .retain(|traced| now.saturating_duration_since(traced.since) <= limit);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::protocol::raft::{Message, RaftNode};

    fn tag(proposer: u64, request_id: u64) -> ProposalTag {
        ProposalTag {
            proposer: NodeId(proposer),
            request_id,
        }
    }

    fn attachment(tag: ProposalTag) -> TraceAttachment {
        TraceAttachment {
            tag,
            context: TraceContext {
                trace_id: [7; 16],
                span_id: [8; 8],
                flags: 1,
            },
        }
    }

    fn append(tags: &[ProposalTag]) -> Message {
        Message::AppendEntries {
            term: 1,
            prev_log_index: 0,
            prev_log_term: 0,
            entries: tags
                .iter()
                .enumerate()
                .map(|(i, &tag)| entry(i as u64 + 1, tag))
                .collect(),
            leader_commit: 0,
        }
    }

    fn entry(index: LogIndex, tag: ProposalTag) -> Entry {
        Entry {
            term: 1,
            index,
            payload: Payload::Command {
                tag,
                data: Bytes::new(),
            },
        }
    }

    #[test]
    fn an_attachment_naming_a_proposal_the_message_does_not_carry_is_ignored() {
        let mut traces = ProposalTraces::default();
        let now = Instant::now();
        let carried = append(&[tag(2, 1), tag(2, 2)]);
        traces.received::<RaftNode>(NodeId(1), &carried, &attachment(tag(2, 9)), now);
        let forward = Message::ForwardProposals {
            term: 1,
            proposals: vec![(5, Bytes::new())],
        };
        // Forwarded by node 3: the tag is (3, 5), not (4, 5).
        traces.received::<RaftNode>(NodeId(3), &forward, &attachment(tag(4, 5)), now);
        let heartbeat = Message::Heartbeat {
            term: 1,
            commit: 0,
            round: 1,
        };
        traces.received::<RaftNode>(NodeId(1), &heartbeat, &attachment(tag(2, 1)), now);
        assert!(traces.is_empty());
        traces.received::<RaftNode>(NodeId(3), &forward, &attachment(tag(3, 5)), now);
        traces.received::<RaftNode>(NodeId(1), &carried, &attachment(tag(2, 2)), now);
        assert_eq!(traces.traced.len(), 2);
    }

    #[test]
    fn followed_proposals_are_bounded_and_forgotten_at_commit_or_expiry() {
        let mut traces = ProposalTraces::default();
        let now = Instant::now();
        let tags: Vec<ProposalTag> = (0..200).map(|i| tag(2, i)).collect();
        let carried = append(&tags);
        for &tag in &tags {
            traces.received::<RaftNode>(NodeId(1), &carried, &attachment(tag), now);
        }
        assert_eq!(
            traces.traced.len(),
            MAX_TRACED,
            "a flood of attachments is capped"
        );
        // Those committed are forgotten; the rest once they outlive the limit.
        let committed: Vec<Entry> = (0..10).map(|i| entry(i + 1, tags[i as usize])).collect();
        traces.committed(&committed);
        assert_eq!(traces.traced.len(), MAX_TRACED - 10);
        traces.expire(now + Duration::from_secs(1), Duration::from_secs(2));
        assert_eq!(traces.traced.len(), MAX_TRACED - 10);
        traces.expire(now + Duration::from_secs(3), Duration::from_secs(2));
        assert!(traces.is_empty());
    }

    /// Records each event's message, its `consensus.sequence` and the name of its span.
    #[derive(Clone, Default)]
    struct EventRecorder(std::sync::Arc<std::sync::Mutex<Vec<(String, String, u64)>>>);

    impl<S> tracing_subscriber::Layer<S> for EventRecorder
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            context: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Fields(String, u64);
            impl tracing::field::Visit for Fields {
                fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                    if matches!(
                        field.name(),
                        "consensus.sequence" | "consensus.batch.entries"
                    ) {
                        self.1 = value;
                    }
                }
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    }
                }
            }
            let mut fields = Fields(String::new(), 0);
            event.record(&mut fields);
            let span = context
                .event_span(event)
                .map_or(String::new(), |span| span.name().to_string());
            self.0.lock().unwrap().push((fields.0, span, fields.1));
        }
    }

    /// The events `work` emits, as [`EventRecorder`] records them.
    fn events_of(work: impl FnOnce()) -> Vec<(String, String, u64)> {
        use tracing_subscriber::layer::SubscriberExt;
        let events = EventRecorder::default();
        let subscriber = tracing_subscriber::registry().with(events.clone());
        tracing::subscriber::with_default(subscriber, work);
        events.0.lock().unwrap().clone()
    }

    #[test]
    fn a_prepared_batch_marks_each_traced_proposal_it_holds() {
        let events = events_of(|| {
            let mut traces = ProposalTraces::default();
            let (traced, untraced) = (tag(1, 1), tag(1, 2));
            let span = tracing::info_span!(target: "consensus::trace", "consensus.proposal");
            traces.proposed(traced, span, Instant::now());
            traces.prepared(3, 7, &[untraced, traced]);
            traces.prepared(3, 8, &[untraced]);
        });
        assert_eq!(
            events,
            vec![("prepared".to_string(), "consensus.proposal".to_string(), 7)]
        );
    }

    #[test]
    fn a_traced_entry_is_marked_when_it_joins_a_write() {
        let events = events_of(|| {
            let mut traces = ProposalTraces::default();
            let span = tracing::info_span!(target: "consensus::trace", "consensus.proposal");
            traces.proposed(tag(1, 1), span, Instant::now());
            traces.appending(&[
                entry(4, tag(1, 2)),
                entry(5, tag(1, 1)),
                entry(6, tag(2, 1)),
            ]);
            assert_eq!(traces.traced[0].index, Some(5));
        });
        assert_eq!(
            events,
            vec![("appended".to_string(), "consensus.proposal".to_string(), 3)]
        );
    }

    #[test]
    fn without_a_recording_subscriber_nothing_is_attached() {
        // Spans that no subscriber records have no OpenTelemetry context to send: the message
        // goes out without an attachment rather than with a made-up one.
        let mut traces = ProposalTraces::default();
        traces.proposed(tag(1, 1), tracing::Span::none(), Instant::now());
        assert!(!traces.is_empty());
        let forward = Message::ForwardProposals {
            term: 1,
            proposals: vec![(1, Bytes::new())],
        };
        assert_eq!(
            traces.attachment_for::<RaftNode>(NodeId(1), NodeId(2), &forward),
            None
        );
    }
}
