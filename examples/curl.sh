#!/usr/bin/env bash
# The OpenAI API of `switchyard serve` with plain curl: the models list, a chat completion and a
# completion.
#
# Start a server from the repository root (the README's first command):
#   cargo run --release -- serve --model tests/fixtures/tiny-bf16
# then:
#   bash examples/curl.sh
#
# OPENAI_BASE_URL   the API's base URL            [http://localhost:8000/v1]
# SWITCHYARD_MODEL  the served model name: the first --served-model-name, else --model as given
#                   [tests/fixtures/tiny-bf16]
# OPENAI_API_KEY    sent as a bearer token when set (for a server started with --api-key)
#
# The tiny fixture is a random model: the text it writes is random too.
set -euo pipefail

base=${OPENAI_BASE_URL:-http://localhost:8000/v1}
model=${SWITCHYARD_MODEL:-tests/fixtures/tiny-bf16}
auth=()
if [ -n "${OPENAI_API_KEY:-}" ]; then auth=(-H "Authorization: Bearer $OPENAI_API_KEY"); fi

post() { # path, JSON body
  curl -sS --fail-with-body "${auth[@]+"${auth[@]}"}" -H 'Content-Type: application/json' -d "$2" "$base$1"
  echo
}

echo "== GET /v1/models"
curl -sS --fail-with-body "${auth[@]+"${auth[@]}"}" "$base/models"
echo

echo "== POST /v1/chat/completions"
post /chat/completions '{
  "model": "'"$model"'",
  "messages": [{"role": "user", "content": "Why is the sky blue?"}],
  "max_tokens": 32, "temperature": 0
}'

echo "== POST /v1/completions (text prompt, vLLM extensions top_k and min_tokens)"
post /completions '{
  "model": "'"$model"'",
  "prompt": "The capital of France is",
  "max_tokens": 16, "temperature": 0.8, "top_k": 40, "min_tokens": 4, "seed": 7
}'

echo "== POST /v1/completions (streamed as server-sent events, usage in the last chunk)"
post /completions '{
  "model": "'"$model"'",
  "prompt": "Once upon a time",
  "max_tokens": 8, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}
}'

echo "== POST /tokenize (served beside /v1, at the server's root)"
curl -sS --fail-with-body "${auth[@]+"${auth[@]}"}" -H 'Content-Type: application/json' \
  -d '{"model": "'"$model"'", "prompt": "Hello world"}' "${base%/v1}/tokenize"
echo
