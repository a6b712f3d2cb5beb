//! Least privilege on Redis: the relay's user may only write the stream, the projector's only read it, manage its
//! consumer group and add dead letters, the query service's only ping; and the services run with just that.
#![allow(clippy::unwrap_used)]

mod common;

use common::CommandApp;
use fred::prelude::*;
use kiroku_relay::stream::acl_rules;

/// A Redis user for this test (ACL users belong to the server), removed by `remove`.
struct AclUser {
    name: String,
    password: String,
}

impl AclUser {
    async fn create(admin: &Client, role: &str, rules: &[String]) -> AclUser {
        let user = AclUser {
            name: format!("kiroku-t-{role}-{}", uuid::Uuid::new_v4().simple()),
            password: uuid::Uuid::new_v4().simple().to_string(),
        };
        let mut args = vec!["on".to_owned(), format!(">{}", user.password)];
        args.extend(rules.iter().cloned());
        admin.acl_setuser(user.name.clone(), args).await.unwrap();
        user
    }

    fn url(&self, db: u8) -> String {
        format!("redis://{}:{}@127.0.0.1:6379/{db}", self.name, self.password)
    }

    async fn client(&self, db: u8) -> Client {
        kiroku_testkit::connect(&self.url(db)).await.unwrap()
    }

    async fn remove(self, admin: &Client) {
        let _: i64 = admin.acl_deluser(self.name).await.unwrap();
    }
}

fn denied<T>(result: Result<T, fred::error::Error>) -> bool {
    matches!(result, Err(error) if error.to_string().contains("NOPERM"))
}

#[tokio::test]
async fn each_services_redis_user_can_do_its_work_and_nothing_else() {
    let admin = kiroku_testkit::connect("redis://127.0.0.1:6379/0").await.unwrap();
    let users: std::sync::Arc<std::sync::Mutex<Vec<AclUser>>> = std::sync::Arc::default();
    let made = users.clone();
    let creator = admin.clone();
    let app = CommandApp::spawn_with_redis(|db, prefix| async move {
        let rules = acl_rules(&prefix);
        let relay = AclUser::create(&creator, "relay", &rules.relay).await;
        let projector = AclUser::create(&creator, "projector", &rules.projector).await;
        let query = AclUser::create(&creator, "query", &rules.query).await;
        let env = vec![("REDIS_URL".to_owned(), relay.url(db))];
        made.lock().unwrap().extend([relay, projector, query]);
        env
    })
    .await;
    let (db, prefix) = (app.redis.db, app.redis.prefix.clone());
    let [relay, projector, query]: [AclUser; 3] = std::mem::take(&mut *users.lock().unwrap()).try_into().ok().unwrap();

    // The services, each with its own user: a registration is published and projected.
    let running = app.start_projector(&[("REDIS_URL", &projector.url(db)), ("KIROKU_REDIS_PREFIX", &prefix)]).await;
    let (queries, _) = app.start_query(&[("REDIS_URL", &query.url(db)), ("KIROKU_REDIS_PREFIX", &prefix)]).await;
    app.github_knows(7301, "acl", None).await;
    app.register(7301, "").await.unwrap();
    app.wait_for_users(1).await;
    let stream = kiroku_relay::stream::events_key(&prefix);
    kiroku_testkit::eventually(std::time::Duration::from_secs(20), "the entry in the stream", || async {
        Ok((app.redis.client.xlen::<u64, _>(&stream).await? >= 1).then_some(()))
    })
    .await
    .unwrap();

    // And nothing else.
    let as_relay = relay.client(db).await;
    assert!(
        denied(as_relay.xrange::<Vec<(String, Vec<(String, String)>)>, _, _, _>(&stream, "-", "+", None).await),
        "the relay cannot read"
    );
    assert!(denied(as_relay.del::<i64, _>(&stream).await), "nor delete the stream");
    let as_projector = projector.client(db).await;
    let forged: Vec<(&str, &str)> = vec![("position", "1")];
    assert!(
        denied(as_projector.xadd::<String, _, _, _, _>(&stream, false, None, "*", forged.clone()).await),
        "the projector cannot write the stream"
    );
    assert!(denied(as_projector.xtrim::<i64, _, _>(&stream, ("MAXLEN", 0)).await));
    assert!(denied(as_projector.del::<i64, _>(&stream).await));
    let dead = kiroku_relay::stream::dead_letters_key(&prefix);
    let _: String = as_projector.xadd(&dead, false, None, "*", forged.clone()).await.unwrap();
    let as_query = query.client(db).await;
    assert!(denied(as_query.xlen::<u64, _>(&stream).await), "the query service reads no key");
    let _: String = as_query.ping(None).await.unwrap();

    queries.stop().await;
    running.stop().await;
    app.stop().await;
    for user in [relay, projector, query] {
        user.remove(&admin).await;
    }
}

#[test]
fn composes_redis_users_have_the_rules_the_code_grants() {
    let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/redis/users.acl")).unwrap();
    let rules = acl_rules("kiroku");
    for (user, expected) in [("relay", rules.relay), ("projector", rules.projector), ("query", rules.query)] {
        let line =
            file.lines().find(|l| l.starts_with(&format!("user {user} "))).unwrap_or_else(|| panic!("no {user}"));
        let after_password = line.splitn(5, ' ').nth(4).unwrap();
        assert_eq!(after_password, expected.join(" "), "{user}");
    }
}
