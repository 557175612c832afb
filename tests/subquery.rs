//! Subquery shapes into the memory sink, through the command line: a `where` that is a
//! disjunction of two subqueries (tags `"h/"`, `"/h"` with `active_conditions`) and one
//! that is a conjunction (composite tags `"h1/h2"`). The first run starts from a
//! snapshot taken before the moves, so its own tag index resolves every move event; the
//! later runs resume and refetch. Either way the store ends with exactly the shape's rows.

use std::collections::BTreeSet;
use std::process::ExitCode;

use serde_json::json;
use shapesync_e2e::{PipelineFile, key, server, shapesync};
use shapesync_testkit::{Column, TableDef, TableHandle, TestServer};

/// Which rows a `where` over `project_id` and `owner_id` admits.
#[derive(Clone, Copy)]
enum Form {
    /// `project_id IN (…) OR owner_id IN (…)`
    Any,
    /// `project_id IN (…) AND owner_id IN (…)`
    All,
}

struct Model {
    form: Form,
    rows: Vec<(u64, u64, u64)>,
    projects: BTreeSet<u64>,
    owners: BTreeSet<u64>,
}

impl Model {
    fn expected(&self, table: &str) -> BTreeSet<String> {
        self.rows
            .iter()
            .filter(|(_, p, o)| {
                let (p, o) = (self.projects.contains(p), self.owners.contains(o));
                match self.form {
                    Form::Any => p || o,
                    Form::All => p && o,
                }
            })
            .map(|(id, _, _)| key(table, *id))
            .collect()
    }
}

fn def(name: &str) -> TableDef {
    TableDef::new(name)
        .column(Column::new("id", "int8").primary_key().not_null())
        .column(Column::new("title", "text"))
        .column(Column::new("project_id", "int8"))
        .column(Column::new("owner_id", "int8"))
}

fn pipeline(id: &str, url: &str, table: &str, where_clause: &str) -> String {
    format!(
        "pipelines:\n  {id}:\n    source:\n      type: electric\n      url: {url}\n      table: {table}\n      where: '{where_clause}'\n    sink:\n      type: memory\n"
    )
}

async fn run_once(name: &str, server: &TestServer, table: &str, where_clause: &str) {
    let file = PipelineFile::new(name, &pipeline(name, &server.url(), table, where_clause));
    assert_eq!(shapesync(&["run", "--once", &file.arg()]).await, ExitCode::SUCCESS);
}

fn stored(name: &str) -> BTreeSet<String> {
    shapesync_sink_memory::store(name).rows().into_keys().collect()
}

/// Moves `value` of position `pos` (0: projects, 1: owners) into or out of its subquery.
fn move_at(model: &mut Model, table: &TableHandle, w: &str, pos: usize, value: u64, into: bool) {
    let set = if pos == 0 { &mut model.projects } else { &mut model.owners };
    if into {
        table.move_in(w, pos, &[&value.to_string()]);
        set.insert(value);
    } else {
        table.move_out(w, pos, &[&value.to_string()]);
        set.remove(&value);
    }
}

async fn follows_moves(form: Form, name: &str) {
    let server = server().await;
    let table = server.create_table(def(name));
    let rows: Vec<(u64, u64, u64)> = (1..=48).map(|i| (i, i % 3, 10 + i % 4)).collect();
    table.seed(rows.iter().map(|(id, p, o)| {
        json!({"id": id.to_string(), "title": format!("row {id}"), "project_id": p.to_string(), "owner_id": o.to_string()})
    }));
    let w = match form {
        Form::Any => "project_id IN (SELECT id FROM projects) OR owner_id IN (SELECT id FROM owners)",
        Form::All => "project_id IN (SELECT id FROM projects) AND owner_id IN (SELECT id FROM owners)",
    };
    let members: &[&[&str]] = &[&["1", "2"], &["10", "11"]];
    match form {
        Form::Any => table.register_subquery_where(w, &["project_id", "owner_id"], members),
        Form::All => table.register_subquery_where_all(w, &["project_id", "owner_id"], members),
    }
    let mut model = Model { form, rows, projects: [1, 2].into(), owners: [10, 11].into() };

    // Another pipeline reads the shape first, so its snapshot predates the moves below
    // and the main pipeline's first run meets them as events after that snapshot.
    let warm = format!("{name}_warm");
    run_once(&warm, &server, name, w).await;
    assert_eq!(stored(&warm), model.expected(name));

    move_at(&mut model, &table, w, 0, 1, false);
    move_at(&mut model, &table, w, 1, 12, true);
    move_at(&mut model, &table, w, 1, 10, false);
    move_at(&mut model, &table, w, 0, 1, true);
    move_at(&mut model, &table, w, 1, 11, false);
    run_once(name, &server, name, w).await;
    assert_eq!(stored(name), model.expected(name), "a fresh run resolves the moves itself");

    // Resumed runs meet move-outs without the earlier rows' tags: they refetch.
    move_at(&mut model, &table, w, 0, 2, false);
    move_at(&mut model, &table, w, 1, 13, true);
    run_once(name, &server, name, w).await;
    assert_eq!(stored(name), model.expected(name), "a resumed run refetches");
    assert!(shapesync_sink_memory::store(name).is_up_to_date());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disjunction_of_subqueries_keeps_rows_another_condition_still_admits() {
    follows_moves(Form::Any, "e2e_sq_any").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_tags_drop_a_row_when_either_subquery_lets_it_go() {
    follows_moves(Form::All, "e2e_sq_all").await;
}
