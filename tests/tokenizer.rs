//! The `tokenizers` crate on the checkpoint's `tokenizer.json` gives transformers' ids (the chat case of
//! the reference was tokenized by transformers' `AutoTokenizer`, with no special tokens added: the
//! rendered template already starts with `<bos>`).

mod common;

use common::{fixtures, reference};
use switchyard_worker::ModelDir;

#[test]
fn chat_prompt_tokenizes_like_transformers() {
    let r = reference("tiny-bf16");
    let case = r.cases.iter().find(|c| c.text.is_some()).expect("a reference case with its rendered text");
    let dir = ModelDir::resolve(fixtures().join("tiny-bf16").to_str().unwrap()).unwrap();
    let tok = dir.tokenizer().unwrap();
    let enc = tok.encode(case.text.as_deref().unwrap(), false).unwrap();
    assert_eq!(enc.get_ids(), &case.prompt_ids[..], "text {:?}", case.text);
    let decoded = tok.decode(enc.get_ids(), false).unwrap();
    assert_eq!(decoded, case.text.clone().unwrap());
}
