//! The commands: each asks the broker, waits when told to, and prints its data (a table or `--json`) on stdout
//! and what happened on stderr.

use anyhow::{Context, bail};
use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::{
    Params, Wait,
    client::Client,
    output::{self, cell, size, table},
};

pub struct Ctx<'a> {
    pub client: &'a Client,
    pub json: bool,
}

/// A path segment, percent-escaped.
pub fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn ns_query(namespace: &Option<String>) -> String {
    match namespace {
        Some(ns) => format!("?namespace={}", escape(ns)),
        None => String::new(),
    }
}

/// `/berth/v1/presets/{name}{rest}` in `namespace`.
pub fn preset_path(name: &str, rest: &str, namespace: &Option<String>) -> String {
    format!(
        "/berth/v1/presets/{}{rest}{}",
        escape(name),
        ns_query(namespace)
    )
}

fn instance_path(instance: &str) -> String {
    format!("/v2/service_instances/{}", escape(instance))
}

/// `key=value` pairs (and `--params-json`) as one JSON object.
pub fn parameters(params: &Params) -> anyhow::Result<Map<String, Value>> {
    let mut out = match params.params_json.as_deref() {
        Some(text) => match serde_json::from_str(text).context("--params-json is not JSON")? {
            Value::Object(map) => map,
            _ => bail!("--params-json must be a JSON object"),
        },
        None => Map::new(),
    };
    for pair in &params.params {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("parameter {pair:?} is not key=value"))?;
        let value =
            serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
        out.insert(key.to_string(), value);
    }
    Ok(out)
}

/// Why a finished operation did not succeed: a task's `error`, or an OSB last_operation's `description`.
fn failure(answer: &Value, fallback: &str) -> String {
    answer["error"]
        .as_str()
        .or_else(|| answer["description"].as_str())
        .unwrap_or(fallback)
        .to_string()
}

impl Ctx<'_> {
    fn print(&self, value: &Value) -> anyhow::Result<()> {
        output::json(value)
    }

    /// Prints a listing answer: whole as JSON with `--json`, else its array `key` as a table, a row per item.
    fn print_listing(
        &self,
        listed: &Value,
        key: &str,
        headers: &[&str],
        row: impl Fn(&Value) -> Vec<String>,
    ) -> anyhow::Result<()> {
        if self.json {
            return self.print(listed);
        }
        let rows: Vec<Vec<String>> = listed[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(row)
            .collect();
        println!("{}", table(headers, &rows));
        Ok(())
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self.client.call(Method::GET, path, None).await?.1)
    }

    /// `(service_id, plan_id)` of an instance, which OSB wants on binds, unbinds and deprovisions.
    async fn ids_of(&self, instance: &str) -> anyhow::Result<(String, String)> {
        let listed = self
            .get(&format!("/berth/v1/instances/{}", escape(instance)))
            .await?;
        let id = |key: &str| {
            listed[key]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("the broker gave no {key} for instance {instance}"))
        };
        Ok((id("service_id")?, id("plan_id")?))
    }

    /// After an OSB request: waits on `last_operation` when asked (and the answer was a 202), fails on anything
    /// but success, and prints `{instance_id, binding_id?, operation, state}` with `--json`.
    async fn finish_osb(
        &self,
        osb_path: &str,
        answer: (u16, Value),
        wait: Wait,
        what: &str,
        ids: Value,
    ) -> anyhow::Result<Value> {
        let (status, body) = answer;
        let operation = body["operation"].as_str().map(str::to_string);
        let mut state = if status == 202 {
            "in progress"
        } else {
            "succeeded"
        };
        if status == 202 && wait.waiting() {
            let last = self
                .client
                .wait_last_operation(
                    &format!("{osb_path}/last_operation"),
                    operation.as_deref(),
                    wait.limit(),
                    what,
                )
                .await?;
            if last["state"] != "succeeded" {
                bail!("{what}: {}", failure(&last, "the operation failed"));
            }
            state = "succeeded";
        }
        eprintln!(
            "{what}: {}",
            if state == "succeeded" {
                "done"
            } else {
                "started"
            }
        );
        let mut summary = ids;
        summary["operation"] = json!(operation);
        summary["state"] = json!(state);
        Ok(summary)
    }

    pub async fn catalog(&self) -> anyhow::Result<()> {
        let catalog = self.get("/v2/catalog").await?;
        if self.json {
            return self.print(&catalog);
        }
        let mut rows = Vec::new();
        for service in catalog["services"].as_array().into_iter().flatten() {
            for plan in service["plans"].as_array().into_iter().flatten() {
                rows.push(vec![
                    cell(&service["name"]),
                    cell(&plan["name"]),
                    cell(&plan["description"]),
                ]);
            }
        }
        println!("{}", table(&["SERVICE", "PLAN", "DESCRIPTION"], &rows));
        Ok(())
    }

    pub async fn provision(
        &self,
        service: &str,
        plan: &str,
        name: Option<String>,
        params: &Params,
        wait: Wait,
        connstr_only: bool,
    ) -> anyhow::Result<()> {
        if connstr_only && !wait.waiting() {
            bail!("--connstr-only needs --wait (or --timeout)");
        }
        let catalog = self.get("/v2/catalog").await?;
        let service_row = catalog["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == service))
            .with_context(|| format!("the catalog has no service {service:?}"))?;
        let plan_row = service_row["plans"]
            .as_array()
            .and_then(|ps| ps.iter().find(|x| x["name"] == plan))
            .with_context(|| format!("service {service:?} has no plan {plan:?}"))?;
        let id = name.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let body = json!({
            "service_id": service_row["id"], "plan_id": plan_row["id"],
            "organization_guid": "berth-cli", "space_guid": "berth-cli",
            "parameters": parameters(params)?,
        });
        let path = instance_path(&id);
        let answer = self
            .client
            .call(
                Method::PUT,
                &format!("{path}?accepts_incomplete=true"),
                Some(&body),
            )
            .await?;
        let what = format!("instance {id}");
        let summary = self
            .finish_osb(&path, answer, wait, &what, json!({ "instance_id": id }))
            .await?;
        if connstr_only {
            let bound = self.bind_and_fetch(&id, None, &Map::new(), wait).await?;
            let credentials = &bound["credentials"];
            let connstr = credentials["DATABASE_URL"]
                .as_str()
                .or_else(|| credentials["uri"].as_str())
                .context("the binding has no DATABASE_URL or uri")?;
            println!("{connstr}");
            return Ok(());
        }
        if self.json {
            return self.print(&summary);
        }
        println!("{id}");
        Ok(())
    }

    pub async fn deprovision(&self, instance: &str, wait: Wait) -> anyhow::Result<()> {
        let (service_id, plan_id) = self.ids_of(instance).await?;
        let path = instance_path(instance);
        // The instance's bindings go with it (their roles and keys are removed by the deprovision).
        let query = format!(
            "service_id={}&plan_id={}&accepts_incomplete=true",
            escape(&service_id),
            escape(&plan_id)
        );
        let answer = self
            .client
            .call(Method::DELETE, &format!("{path}?{query}"), None)
            .await?;
        let what = format!("instance {instance}");
        let summary = self
            .finish_osb(
                &path,
                answer,
                wait,
                &what,
                json!({ "instance_id": instance }),
            )
            .await?;
        if self.json {
            self.print(&summary)?;
        }
        Ok(())
    }

    /// Every instance, all pages.
    pub async fn list(&self, page_size: u32) -> anyhow::Result<()> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = format!("/berth/v1/instances?limit={page_size}");
            if let Some(after) = &after {
                path.push_str(&format!("&after={}", escape(after)));
            }
            let page = self.get(&path).await?;
            all.extend(page["instances"].as_array().cloned().unwrap_or_default());
            match page["next_after"].as_str() {
                Some(next) => after = Some(next.to_string()),
                None => break,
            }
        }
        self.print_listing(
            &json!({ "instances": all }),
            "instances",
            &["ID", "SERVICE", "PLAN", "OPERATION", "STATE", "CREATED"],
            |i| {
                let last = &i["last_operation"];
                vec![
                    cell(&i["id"]),
                    cell(&i["service"]),
                    cell(&i["plan"]),
                    cell(&last["type"]),
                    cell(&last["state"]),
                    cell(&i["created_at"]),
                ]
            },
        )
    }

    pub async fn status(&self, instance: &str) -> anyhow::Result<()> {
        let listed = self
            .get(&format!("/berth/v1/instances/{}", escape(instance)))
            .await?;
        if self.json {
            return self.print(&listed);
        }
        let last = &listed["last_operation"];
        let lines = [
            ("instance", cell(&listed["id"])),
            (
                "plan",
                format!("{} / {}", cell(&listed["service"]), cell(&listed["plan"])),
            ),
            ("created", cell(&listed["created_at"])),
            (
                "operation",
                format!("{} {}", cell(&last["type"]), cell(&last["state"])),
            ),
            ("description", cell(&last["description"])),
            ("parameters", cell(&listed["parameters"])),
        ];
        for (key, value) in lines {
            println!("{key:<12} {value}");
        }
        Ok(())
    }

    pub async fn update(
        &self,
        instance: &str,
        plan: Option<&str>,
        params: &Params,
        wait: Wait,
    ) -> anyhow::Result<()> {
        let (service_id, plan_id) = self.ids_of(instance).await?;
        let mut body = json!({ "service_id": service_id });
        if let Some(plan) = plan {
            let catalog = self.get("/v2/catalog").await?;
            let new_plan = catalog["services"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["id"] == service_id.as_str()))
                .and_then(|s| s["plans"].as_array())
                .and_then(|ps| ps.iter().find(|p| p["name"] == plan))
                .with_context(|| format!("the instance's service has no plan {plan:?}"))?;
            body["plan_id"] = new_plan["id"].clone();
        } else {
            body["plan_id"] = json!(plan_id);
        }
        let given = parameters(params)?;
        if !given.is_empty() {
            body["parameters"] = Value::Object(given);
        }
        let path = instance_path(instance);
        let answer = self
            .client
            .call(
                Method::PATCH,
                &format!("{path}?accepts_incomplete=true"),
                Some(&body),
            )
            .await?;
        let what = format!("instance {instance}");
        let summary = self
            .finish_osb(
                &path,
                answer,
                wait,
                &what,
                json!({ "instance_id": instance }),
            )
            .await?;
        if self.json {
            self.print(&summary)?;
        }
        Ok(())
    }

    /// Binds, waits for the credentials and fetches the binding.
    async fn bind_and_fetch(
        &self,
        instance: &str,
        name: Option<String>,
        params: &Map<String, Value>,
        wait: Wait,
    ) -> anyhow::Result<Value> {
        let (service_id, plan_id) = self.ids_of(instance).await?;
        let binding = name.unwrap_or_else(|| format!("cli-{}", uuid::Uuid::new_v4()));
        let path = format!(
            "{}/service_bindings/{}",
            instance_path(instance),
            escape(&binding)
        );
        let body = json!({ "service_id": service_id, "plan_id": plan_id, "parameters": params });
        let answer = self
            .client
            .call(
                Method::PUT,
                &format!("{path}?accepts_incomplete=true"),
                Some(&body),
            )
            .await?;
        let what = format!("binding {binding} of {instance}");
        self.finish_osb(&path, answer, wait, &what, json!({}))
            .await?;
        let mut bound = self.get(&path).await?;
        bound["instance_id"] = json!(instance);
        bound["binding_id"] = json!(binding);
        Ok(bound)
    }

    pub async fn bind(
        &self,
        instance: &str,
        name: Option<String>,
        params: &Params,
        wait: Wait,
    ) -> anyhow::Result<()> {
        let bound = self
            .bind_and_fetch(instance, name, &parameters(params)?, wait)
            .await?;
        if self.json {
            return self.print(&bound);
        }
        eprintln!("binding {}", cell(&bound["binding_id"]));
        // `KEY=value` lines, ready for an env file.
        for (key, value) in bound["credentials"].as_object().into_iter().flatten() {
            println!("{key}={}", cell(value));
        }
        Ok(())
    }

    pub async fn unbind(&self, instance: &str, binding: &str, wait: Wait) -> anyhow::Result<()> {
        let (service_id, plan_id) = self.ids_of(instance).await?;
        let path = format!(
            "{}/service_bindings/{}",
            instance_path(instance),
            escape(binding)
        );
        let query = format!(
            "service_id={}&plan_id={}&accepts_incomplete=true",
            escape(&service_id),
            escape(&plan_id)
        );
        let answer = self
            .client
            .call(Method::DELETE, &format!("{path}?{query}"), None)
            .await?;
        let what = format!("binding {binding} of {instance}");
        let ids = json!({ "instance_id": instance, "binding_id": binding });
        let summary = self.finish_osb(&path, answer, wait, &what, ids).await?;
        if self.json {
            self.print(&summary)?;
        }
        Ok(())
    }

    pub async fn rotate_credentials(&self, instance: &str, wait: Wait) -> anyhow::Result<()> {
        let path = instance_path(instance);
        let answer = self
            .client
            .call(
                Method::PUT,
                &format!("{path}/actions/credentials?accepts_incomplete=true"),
                Some(&json!({})),
            )
            .await?;
        let what = format!("credentials of {instance}");
        let summary = self
            .finish_osb(
                &path,
                answer,
                wait,
                &what,
                json!({ "instance_id": instance }),
            )
            .await?;
        if self.json {
            self.print(&summary)?;
        }
        Ok(())
    }

    /// `switchover` or `failover` of an HA cluster.
    pub async fn change_primary(
        &self,
        verb: &str,
        instance: &str,
        candidate: Option<String>,
        wait: Wait,
    ) -> anyhow::Result<()> {
        let body = match candidate {
            Some(c) => json!({ "candidate": c }),
            None => json!({}),
        };
        let answer = self
            .client
            .call(
                Method::POST,
                &format!("/berth/v1/instances/{}/{verb}", escape(instance)),
                Some(&body),
            )
            .await?;
        let what = format!("{verb} of {instance}");
        let summary = self
            .finish_osb(
                &instance_path(instance),
                answer,
                wait,
                &what,
                json!({ "instance_id": instance }),
            )
            .await?;
        if self.json {
            self.print(&summary)?;
        }
        Ok(())
    }

    pub async fn price_check(&self, requirements: &[String]) -> anyhow::Result<()> {
        let mut query = Vec::new();
        for pair in requirements {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("requirement {pair:?} is not key=value"))?;
            query.push(format!("{}={}", escape(key), escape(value)));
        }
        let answer = self
            .get(&format!("/berth/v1/price-check?{}", query.join("&")))
            .await?;
        if self.json {
            return self.print(&answer);
        }
        eprintln!(
            "region {}, {}, {} matching types, prices as of {}",
            cell(&answer["region"]),
            if answer["spot"] == true {
                "spot"
            } else {
                "on-demand"
            },
            cell(&answer["matching_types"]),
            cell(&answer["prices_as_of"])
        );
        let rows: Vec<Vec<String>> = answer["candidates"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                vec![
                    cell(&c["instance_type"]),
                    cell(&c["zone"]),
                    cell(&c["price"]),
                    cell(&c["vcpus"]),
                    cell(&c["memory_gb"]),
                    cell(&c["arch"]),
                ]
            })
            .collect();
        println!(
            "{}",
            table(
                &["TYPE", "ZONE", "PRICE/H", "VCPUS", "MEMORY_GB", "ARCH"],
                &rows
            )
        );
        Ok(())
    }

    /// POSTs a request that starts a task (202 `{operation, ...}`), waits for it when asked, prints the answer.
    pub async fn post_task(
        &self,
        path: &str,
        body: &Value,
        wait: Wait,
        what: &str,
    ) -> anyhow::Result<()> {
        let (_, answer) = self.client.call(Method::POST, path, Some(body)).await?;
        self.finish_task(answer, wait, what).await
    }

    async fn finish_task(&self, mut answer: Value, wait: Wait, what: &str) -> anyhow::Result<()> {
        if wait.waiting() {
            let operation = answer["operation"]
                .as_str()
                .context("the broker gave no operation")?
                .to_string();
            let task = self
                .client
                .wait_task(&operation, wait.limit(), what)
                .await?;
            if task["state"] != "succeeded" {
                bail!("{what}: {}", failure(&task, "the operation failed"));
            }
            answer["state"] = json!("succeeded");
            eprintln!("{what}: done");
        }
        self.print(&answer)
    }

    pub async fn presets_list(&self, namespace: &Option<String>) -> anyhow::Result<()> {
        let listed = self
            .get(&format!("/berth/v1/presets{}", ns_query(namespace)))
            .await?;
        self.print_listing(
            &listed,
            "presets",
            &["NAME", "NAMESPACE", "LATEST", "VERSIONS", "LOCKED"],
            |p| {
                vec![
                    cell(&p["name"]),
                    cell(&p["namespace"]),
                    cell(&p["latest_version"]),
                    cell(&p["versions"]),
                    if p["lock"]["locked"] == true {
                        format!("by {}", cell(&p["lock"]["by"]))
                    } else {
                        "-".into()
                    },
                ]
            },
        )
    }

    pub async fn presets_versions(
        &self,
        name: &str,
        namespace: &Option<String>,
    ) -> anyhow::Result<()> {
        let listed = self.get(&preset_path(name, "/versions", namespace)).await?;
        self.print_listing(
            &listed,
            "versions",
            &["VERSION", "STATE", "SIZE", "CREATED", "BY", "DESCRIPTION"],
            |v| {
                vec![
                    cell(&v["version"]),
                    cell(&v["state"]),
                    size(&v["size_bytes"]),
                    cell(&v["created_at"]),
                    cell(&v["created_by"]),
                    cell(&v["description"]),
                ]
            },
        )
    }

    pub async fn presets_lock(
        &self,
        name: &str,
        by: &str,
        reason: &str,
        namespace: &Option<String>,
    ) -> anyhow::Result<()> {
        let path = preset_path(name, "/lock", namespace);
        let (_, answer) = self
            .client
            .call(
                Method::POST,
                &path,
                Some(&json!({"by": by, "reason": reason})),
            )
            .await?;
        if self.json {
            return self.print(&answer);
        }
        eprintln!("locked; pushes and unlock need this key:");
        println!("{}", answer["lock_key"].as_str().unwrap_or_default());
        Ok(())
    }

    pub async fn presets_unlock(
        &self,
        name: &str,
        lock_key: &str,
        namespace: &Option<String>,
    ) -> anyhow::Result<()> {
        let path = preset_path(name, "/lock", namespace);
        let (_, answer) = self
            .client
            .call(Method::DELETE, &path, Some(&json!({"lock_key": lock_key})))
            .await?;
        if self.json {
            return self.print(&answer);
        }
        eprintln!("preset {name}: unlocked");
        Ok(())
    }

    pub async fn presets_get_lock(
        &self,
        name: &str,
        namespace: &Option<String>,
    ) -> anyhow::Result<()> {
        let lock = self.get(&preset_path(name, "/lock", namespace)).await?;
        if self.json {
            return self.print(&lock);
        }
        if lock["locked"] == true {
            println!(
                "locked by {} since {}: {}",
                cell(&lock["by"]),
                cell(&lock["at"]),
                cell(&lock["reason"])
            );
        } else {
            println!("not locked");
        }
        Ok(())
    }

    pub async fn presets_delete(
        &self,
        name: &str,
        version: Option<i32>,
        namespace: &Option<String>,
        wait: Wait,
    ) -> anyhow::Result<()> {
        let rest = version
            .map(|v| format!("/versions/{v}"))
            .unwrap_or_default();
        let path = preset_path(name, &rest, namespace);
        let (_, answer) = self.client.call(Method::DELETE, &path, None).await?;
        let what = match version {
            Some(v) => format!("version {v} of preset {name}"),
            None => format!("preset {name}"),
        };
        self.finish_task(answer, wait, &what).await
    }

    pub async fn backups_list(&self, instance: &str) -> anyhow::Result<()> {
        let listed = self
            .get(&format!("/berth/v1/instances/{}/backups", escape(instance)))
            .await?;
        self.print_listing(
            &listed,
            "backups",
            &["ID", "STATE", "SIZE", "CREATED", "BY"],
            |b| {
                vec![
                    cell(&b["id"]),
                    cell(&b["state"]),
                    size(&b["size_bytes"]),
                    cell(&b["created_at"]),
                    cell(&b["created_by"]),
                ]
            },
        )
    }

    pub async fn backups_delete(
        &self,
        instance: &str,
        backup: &str,
        wait: Wait,
    ) -> anyhow::Result<()> {
        let path = format!(
            "/berth/v1/instances/{}/backups/{}",
            escape(instance),
            escape(backup)
        );
        let (_, answer) = self.client.call(Method::DELETE, &path, None).await?;
        self.finish_task(answer, wait, &format!("backup {backup}"))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_merge_json_and_pairs() {
        let params = Params {
            params: vec!["size=3".into(), "name=x=y".into(), "on=true".into()],
            params_json: Some(r#"{"size": 1, "keep": [1]}"#.into()),
        };
        let merged = Value::Object(parameters(&params).unwrap());
        assert_eq!(
            merged,
            json!({"size": 3, "name": "x=y", "on": true, "keep": [1]})
        );
        let bad = Params {
            params: vec!["novalue".into()],
            params_json: None,
        };
        assert!(parameters(&bad).is_err());
    }

    #[test]
    fn paths_escape_segments() {
        assert_eq!(escape("a b/c"), "a%20b%2Fc");
        assert_eq!(
            preset_path("shop", "/versions/2", &Some("team/main".into())),
            "/berth/v1/presets/shop/versions/2?namespace=team%2Fmain"
        );
    }
}
