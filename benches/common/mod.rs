//! What the benchmarks write: events as the services write them.
#![allow(clippy::unwrap_used)]

use chrono::Utc;
use kiroku_domain::{Auth0Subject, GitHubId, GitHubProfile, RegisterUser, User, UserCommand, UserEvent, UserId};
use kiroku_event_store::{Append, Claim, EventMetadata, ExpectedVersion, NewEvent};
use kiroku_vault::{SealingKey, Vault};

/// What RegisterUser commits for GitHub account `n`: the event sealed under the person's new key, stored with it.
pub(crate) fn registration(vault: &Vault, n: u64) -> Append {
    let subject: Auth0Subject = format!("github|{n}").parse().unwrap();
    let profile =
        GitHubProfile { id: GitHubId::new(n), login: format!("user{n}"), name: None, avatar_url: None, etag: None };
    let command = UserCommand::Register(RegisterUser { subject: subject.clone(), profile, now: Utc::now() });
    let (event_type, data) = User::decide(None, &command).unwrap()[0].encode().unwrap();
    let user = UserId::generate().as_uuid();
    let (key, wrapped) = vault.new_key(user).unwrap();
    let mut events = vec![NewEvent {
        event_type: event_type.to_owned(),
        data,
        metadata: EventMetadata {
            request_id: None,
            correlation_id: n.to_string(),
            causation_id: n.to_string(),
            schema_version: kiroku_domain::SCHEMA_VERSION,
            caller: None,
            traceparent: None,
        },
        occurred_at: Utc::now(),
    }];
    vault.seal(user, &SealingKey::Live(key), &mut events).unwrap();
    Append {
        aggregate_id: user,
        aggregate_type: UserEvent::AGGREGATE_TYPE.to_owned(),
        expected: ExpectedVersion::NoStream,
        events,
        claims: User::claims(&subject)
            .into_iter()
            // Claims of identities hold keyed hashes (a trigger refuses them in clear); a stand-in will do here.
            .map(|(kind, value)| Claim { kind: kind.as_str().to_owned(), value: format!("h1~{value}") })
            .collect(),
        new_key: Some(wrapped),
        erasure: None,
        idempotency: None,
    }
}
