//! The built-in story corpus: deterministic, varied, story-shaped, and of the promised size.

use std::collections::HashSet;

use train::corpus::{generate, DEFAULT_STORIES};

#[test]
fn same_seed_same_corpus_and_longer_corpora_extend_shorter_ones() {
    let a = generate(50, 3);
    assert_eq!(a, generate(50, 3));
    assert_eq!(generate(20, 3), a[..20]);
    let b = generate(50, 4);
    assert!(a.iter().zip(&b).filter(|(x, y)| x == y).count() < 2, "another seed gives other stories");
}

#[test]
fn default_corpus_is_a_few_hundred_kilobytes_of_distinct_stories() {
    let stories = generate(DEFAULT_STORIES, 1);
    let bytes: usize = stories.iter().map(String::len).sum();
    assert!((200_000..1_000_000).contains(&bytes), "{bytes} bytes");
    let distinct: HashSet<&String> = stories.iter().collect();
    assert!(distinct.len() as f64 >= 0.99 * stories.len() as f64, "{} distinct of {}", distinct.len(), stories.len());
    // Openings vary too, not only names.
    let first_sentences: HashSet<&str> = stories.iter().map(|s| s.split('.').next().unwrap()).collect();
    assert!(first_sentences.len() > stories.len() / 4, "{} distinct first sentences", first_sentences.len());
}

#[test]
fn stories_look_like_stories() {
    let stories = generate(300, 11);
    let mut words = HashSet::new();
    let mut with_dialogue = 0;
    for story in &stories {
        assert!(story.is_ascii(), "{story}");
        assert!(story.len() > 300 && story.len() < 2000, "{} bytes: {story}", story.len());
        let first = story.chars().next().unwrap();
        assert!(first.is_ascii_uppercase(), "starts with a capital: {story}");
        assert!(story.ends_with('.') || story.ends_with('!') || story.ends_with('"'), "ends a sentence: {story}");
        assert!(story.contains("\n\n"), "has paragraphs: {story}");
        assert!(!story.contains("  ") && !story.contains(" ."), "no doubled spaces or loose periods: {story}");
        assert_eq!(story.matches('"').count() % 2, 0, "quotes are balanced: {story}");
        with_dialogue += story.contains('"') as usize;
        words.extend(story.split_whitespace().map(|w| w.trim_matches(|c: char| !c.is_alphabetic()).to_lowercase()));
    }
    assert!(with_dialogue as f64 > 0.9 * stories.len() as f64, "{with_dialogue} stories with dialogue");
    // A small but not tiny vocabulary: enough to learn, varied enough to be interesting.
    assert!((300..3000).contains(&words.len()), "{} distinct words", words.len());
}
