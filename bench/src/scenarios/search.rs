//! The Tantivy scenario: the search view rebuild against bare
//! `add_document`.

use crate::{Measured, Missing};

use super::*;

#[cfg(not(feature = "view-search"))]
pub(crate) async fn tantivy_rebuild(_: &mut Ctx) -> Result<Measured, Missing> {
    Err(Missing::Skip("built without feature view-search: run with --features view-search".into()))
}

// Kept in one piece: A scenario reads top to bottom (seed, measure KES, measure the baseline, clean up); split,
// its steps would hand each other every local.
#[cfg(feature = "view-search")]
pub(crate) async fn tantivy_rebuild(ctx: &mut Ctx) -> Result<Measured, Missing> {
    use kes_core::RowChange;
    use kes_examples::resources;
    use tantivy::{Index, TantivyDocument};

    let rounds = ctx.plan.short_rebuild_rounds();
    let view = resources::project_view();
    let (url, docs) = {
        let seeded = ctx.seeded().await?;
        let docs: Vec<TantivyDocument> = seeded
            .states
            .iter()
            .map(|(id, p)| -> anyhow::Result<TantivyDocument> {
                let change = RowChange {
                    id: id.clone(),
                    version: 1,
                    state: kes_core::RowChange::state_of(&p)?,
                    row: Some(resources::project_row(p)),
                };
                Ok(kes_view_search::index_document(&view, &change)?)
            })
            .collect::<anyhow::Result<_>>()?;
        (seeded.url.clone(), docs)
    };
    let dir = tempfile::tempdir().map_err(anyhow::Error::from)?;
    let index_dir = dir.path().join("index");
    let service = Service::open(&Settings::new(url, index_dir.display().to_string())).await?;
    let n = docs.len() as f64;
    let raw_round = |round: usize| {
        let docs = docs.clone();
        let path = dir.path().join(format!("raw{round}"));
        let view = view.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
            let started = Instant::now();
            std::fs::create_dir_all(&path)?;
            let index = Index::create_in_dir(&path, kes_view_search::index_schema(&view))?;
            kes_view_search::register_tokenizers(&index);
            let mut writer: tantivy::IndexWriter<TantivyDocument> = index.writer_with_num_threads(1, 50_000_000)?;
            for doc in docs {
                writer.add_document(doc)?;
            }
            writer.commit()?;
            let secs = started.elapsed().as_secs_f64();
            drop(writer);
            let _ = std::fs::remove_dir_all(&path);
            Ok(secs)
        })
    };
    let mut round = 0;
    let (k, b) = interleave!(
        rounds,
        {
            let report = service.rebuild("projects", &|_, _| {}).await?;
            report.events as f64 / report.elapsed.as_secs_f64()
        },
        {
            round += 1;
            n / raw_round(round).await.map_err(anyhow::Error::from)??
        }
    );
    service.shutdown().await;
    Ok(Measured {
        smaller: None,
        kes: k,
        baseline: b,
        note: "ProjectionRunner::rebuild of the projects view into a Tantivy index (kes-view-search), reading the \
               log from the same PostgreSQL store; baseline: the same documents (built beforehand with \
               kes_view_search::index_document) written with IndexWriter::add_document (1 thread, 50 MB) and one \
               commit into a fresh index"
            .into(),
    })
}
