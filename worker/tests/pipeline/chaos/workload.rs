//! The clients: a steady mixed workload (create, update and delete users, post events) against both
//! api replicas, writing down every acknowledged write. A request whose outcome the client cannot
//! know (the connection broke after it was sent, or a 5xx) makes that user "uncertain": its exact
//! state is no longer checked, but everything the service acknowledged still is.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::watch;

const EVENT_TYPES: [&str; 3] = ["login", "click", "view"];

/// What the clients know the service acknowledged.
#[derive(Default)]
pub struct Record {
    pub users: HashMap<String, UserRecord>,
    /// Acknowledged events: id → (user id, type).
    pub events: HashMap<String, (String, String)>,
    /// Operations by kind and outcome (`acked`, `refused` = a definite error answer or no
    /// connection, `unknown`).
    pub operations: BTreeMap<(&'static str, &'static str), u64>,
    /// A GET right after an acknowledged PUT or DELETE showed the state before it.
    pub stale_reads: Vec<String>,
    /// Answers that contradict the record (e.g. 404 for an acknowledged, undeleted user).
    pub anomalies: Vec<String>,
}

/// One user as its client knows it.
#[derive(Debug, Clone)]
pub struct UserRecord {
    /// `first_name` after the last acknowledged write.
    pub first_name: String,
    pub deleted: bool,
    /// Some write's outcome is unknown: only acknowledged facts about this user are checked.
    pub uncertain: bool,
}

enum Outcome {
    Acked(Value),
    /// A definite answer that changed nothing (4xx), or a request that never reached a server.
    Refused(u16),
    /// Sent, but no usable answer: it may or may not have been applied.
    Unknown,
}

struct Client {
    http: reqwest::Client,
    apis: Vec<String>,
    rng: StdRng,
    record: Arc<Mutex<Record>>,
    own_users: Vec<String>,
    serial: u64,
}

/// Runs `clients` clients, each at `rate_per_client` operations per second, until `stop` turns true.
pub async fn run(
    apis: Vec<String>,
    seed: u64,
    clients: usize,
    rate_per_client: f64,
    record: Arc<Mutex<Record>>,
    stop: watch::Receiver<bool>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .default_headers(testkit::auth::all_scopes_headers())
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for n in 0..clients {
        let mut client = Client {
            http: http.clone(),
            apis: apis.clone(),
            rng: StdRng::seed_from_u64(seed.wrapping_add(1 + n as u64)),
            record: Arc::clone(&record),
            own_users: Vec::new(),
            serial: 0,
        };
        let mut stop = stop.clone();
        let period = Duration::from_secs_f64(1.0 / rate_per_client);
        tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !*stop.borrow() {
                tokio::select! {
                    _ = stop.changed() => {}
                    _ = ticks.tick() => client.step().await,
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

impl Client {
    async fn step(&mut self) {
        let live: Vec<String> = {
            let record = self.record.lock().unwrap();
            self.own_users.iter().filter(|id| !record.users[*id].deleted).cloned().collect()
        };
        let roll = self.rng.random_range(0..100);
        if live.is_empty() || roll < 15 {
            self.create_user().await;
            return;
        }
        let user = live[self.rng.random_range(0..live.len())].clone();
        match roll {
            15..75 => self.post_event(&user).await,
            75..93 => self.update_user(&user).await,
            _ => self.delete_user(&user).await,
        }
    }

    fn api(&mut self) -> String {
        self.apis[self.rng.random_range(0..self.apis.len())].clone()
    }

    async fn send(&mut self, request: reqwest::RequestBuilder) -> Outcome {
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                match response.json::<Value>().await {
                    _ if status >= 500 => Outcome::Unknown,
                    Ok(body) if status < 300 => Outcome::Acked(body),
                    Err(_) if status == 204 => Outcome::Acked(Value::Null),
                    Err(_) if status < 300 => Outcome::Unknown,
                    _ => Outcome::Refused(status),
                }
            }
            Err(err) if err.is_connect() => Outcome::Refused(0),
            Err(_) => Outcome::Unknown,
        }
    }

    fn count(&self, operation: &'static str, outcome: &Outcome) {
        let outcome = match outcome {
            Outcome::Acked(..) => "acked",
            Outcome::Refused(_) => "refused",
            Outcome::Unknown => "unknown",
        };
        *self.record.lock().unwrap().operations.entry((operation, outcome)).or_default() += 1;
    }

    async fn create_user(&mut self) {
        self.serial += 1;
        let first_name = format!("C{}", self.serial);
        let body = json!({"email": format!("{}@chaos.example", testkit::unique()), "first_name": first_name, "last_name": "Chaos"});
        let api = self.api();
        let outcome = self.send(self.http.post(format!("{api}/api/v1/users")).json(&body)).await;
        self.count("create user", &outcome);
        if let Outcome::Acked(user) = outcome {
            let id = user["id"].as_str().unwrap().to_owned();
            let record = UserRecord { first_name, deleted: false, uncertain: false };
            self.record.lock().unwrap().users.insert(id.clone(), record);
            self.own_users.push(id);
        }
    }

    async fn post_event(&mut self, user: &str) {
        let event_type = EVENT_TYPES[self.rng.random_range(0..EVENT_TYPES.len())];
        let body = json!({"user_id": user, "type": event_type, "data": {"serial": self.serial}});
        let api = self.api();
        let outcome = self.send(self.http.post(format!("{api}/api/v1/events")).json(&body)).await;
        self.count("post event", &outcome);
        let mut record = self.record.lock().unwrap();
        match outcome {
            Outcome::Acked(event) => {
                let id = event["id"].as_str().unwrap().to_owned();
                record.events.insert(id, (user.to_owned(), event_type.to_owned()));
            }
            Outcome::Refused(404) if !record.users[user].uncertain => {
                record.anomalies.push(format!("POST event: 404 for acknowledged user {user}"));
            }
            _ => {}
        }
    }

    async fn update_user(&mut self, user: &str) {
        self.serial += 1;
        let first_name = format!("U{}", self.serial);
        let api = self.api();
        let outcome = self
            .send(self.http.put(format!("{api}/api/v1/users/{user}")).json(&json!({"first_name": first_name})))
            .await;
        self.count("update user", &outcome);
        match outcome {
            Outcome::Acked(..) => {
                let uncertain = {
                    let mut record = self.record.lock().unwrap();
                    let entry = record.users.get_mut(user).unwrap();
                    entry.first_name = first_name.clone();
                    entry.uncertain
                };
                if !uncertain {
                    self.check_read(user, Some(&first_name)).await;
                }
            }
            Outcome::Refused(404) => self.refused_404(user, "PUT"),
            Outcome::Refused(_) => {}
            Outcome::Unknown => self.record.lock().unwrap().users.get_mut(user).unwrap().uncertain = true,
        }
    }

    async fn delete_user(&mut self, user: &str) {
        let api = self.api();
        let outcome = self.send(self.http.delete(format!("{api}/api/v1/users/{user}"))).await;
        self.count("delete user", &outcome);
        match outcome {
            Outcome::Acked(..) => {
                self.record.lock().unwrap().users.get_mut(user).unwrap().deleted = true;
                self.check_read(user, None).await;
            }
            Outcome::Refused(404) => self.refused_404(user, "DELETE"),
            Outcome::Refused(_) => {}
            Outcome::Unknown => {
                // Maybe deleted: stop using it, check nothing exact about it.
                let mut record = self.record.lock().unwrap();
                let entry = record.users.get_mut(user).unwrap();
                entry.uncertain = true;
                entry.deleted = true;
            }
        }
    }

    fn refused_404(&self, user: &str, what: &str) {
        let mut record = self.record.lock().unwrap();
        if !record.users[user].uncertain {
            record.anomalies.push(format!("{what}: 404 for acknowledged user {user}"));
        }
    }

    /// Right after an acknowledged write, every replica must show it (`None`: the user is gone).
    async fn check_read(&mut self, user: &str, first_name: Option<&str>) {
        for api in self.apis.clone() {
            let Ok(response) = self.http.get(format!("{api}/api/v1/users/{user}")).send().await else { continue };
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let stale = match (first_name, status) {
                (Some(expected), 200) => body["first_name"].as_str() != Some(expected),
                (Some(_), 404) | (None, 200) => true,
                _ => false, // 503 and the like: nothing served, nothing stale
            };
            if stale {
                let expected = first_name.unwrap_or("404");
                self.record
                    .lock()
                    .unwrap()
                    .stale_reads
                    .push(format!("{api}: user {user} {status} {body} (expected {expected})"));
            }
        }
    }
}
