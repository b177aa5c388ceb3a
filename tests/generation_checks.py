"""Generation checks equivalent to transformers' ``GenerationTesterMixin``, written for Astrea.

The transformers source distribution ships the common model tests but not ``tests/generation``, so
these are our own. They cover what the mixin covers -- greedy, sampling, beam search, beam
sampling, assisted and prompt-lookup decoding, ``num_return_sequences``, left padding,
``inputs_embeds``, continuing from a cache, the static cache and ``torch.compile`` -- and each one
checks an equality between two paths rather than that ``generate`` merely runs:

* every path against a cache-free reference (a full forward pass of the whole sequence);
* sampling with ``top_k=1`` and beam search with one beam against greedy decoding;
* beam scores against log-probabilities recomputed from a forward pass;
* batched, padded and expanded inputs against each sample alone (images included: a sample may
  hold several images or none, and beams must repeat a sample's images as a group).

The class is a mixin (``model_tester`` provides ``prepare_config_and_inputs_for_common()`` as for
``ModelTesterMixin``); ``transformers_common`` also registers it as the stand-in for the missing
``GenerationTesterMixin``.
"""

from __future__ import annotations

import copy

import torch
from transformers import CompileConfig
from transformers.generation import GenerationConfig

MAX_NEW_TOKENS = 4


class GenerationChecks:
    model_tester = None
    all_model_classes = ()

    # ------------------------------------------------------------------------------ helpers
    def _generative_class(self):
        classes = [cls for cls in self.all_model_classes if cls.can_generate()]
        self.assertEqual(len(classes), 1, f"expected one generative class in {self.all_model_classes}")
        return classes[0]

    def _model_and_inputs(self, batch_size: int = 2):
        """A fresh eval model and the tester's inputs cut to ``batch_size`` samples, all tokens real."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config = copy.deepcopy(config)
        torch.manual_seed(0)
        model = self._generative_class()(config).eval()
        inputs = {key: value[:batch_size] for key, value in inputs.items()}
        return model, inputs

    @staticmethod
    def _greedy_kwargs(**extra):
        # min_new_tokens keeps EOS out, so that every path generates exactly MAX_NEW_TOKENS tokens.
        return {"do_sample": False, "max_new_tokens": MAX_NEW_TOKENS, "min_new_tokens": MAX_NEW_TOKENS, **extra}

    def _reference_logits(self, model, inputs, sequences):
        """Next-token logits at every generated step from one cache-free forward of the whole sequence."""
        prompt_length = inputs["input_ids"].shape[1]
        attention_mask = torch.cat(
            [inputs["attention_mask"], torch.ones(sequences.shape[0], sequences.shape[1] - prompt_length, dtype=torch.long)], dim=1
        )
        pixels = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **pixels).logits
        return logits[:, prompt_length - 1 : -1]

    def _assert_same_tokens(self, got, want, msg=""):
        self.assertEqual(got.tolist(), want.tolist(), msg)

    # ------------------------------------------------------------------------------ greedy
    def test_greedy_generate_matches_a_cache_free_forward(self):
        model, inputs = self._model_and_inputs()
        out = model.generate(**inputs, **self._greedy_kwargs(), output_logits=True, return_dict_in_generate=True)
        self.assertEqual(out.sequences.shape, (2, inputs["input_ids"].shape[1] + MAX_NEW_TOKENS))
        reference = self._reference_logits(model, inputs, out.sequences)
        generated = torch.stack(out.logits, dim=1)
        torch.testing.assert_close(generated, reference, rtol=1e-4, atol=1e-4)
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        self._assert_same_tokens(new_tokens, reference.argmax(-1), "greedy tokens are not the argmax of the reference logits")

    def test_greedy_generate_dict_outputs_hidden_states_and_attentions(self):
        model, inputs = self._model_and_inputs()
        model.set_attn_implementation("eager")
        out = model.generate(
            **inputs, **self._greedy_kwargs(), output_scores=True, output_hidden_states=True, output_attentions=True, return_dict_in_generate=True
        )
        layers = model.config.text_config.num_hidden_layers
        prompt = inputs["input_ids"].shape[1]
        self.assertEqual(len(out.scores), MAX_NEW_TOKENS)
        self.assertEqual(len(out.hidden_states), MAX_NEW_TOKENS)
        self.assertEqual(len(out.attentions), MAX_NEW_TOKENS)
        for step, (hidden, attention) in enumerate(zip(out.hidden_states, out.attentions)):
            self.assertEqual(len(hidden), layers + 1)
            self.assertEqual(len(attention), layers)
            query = prompt if step == 0 else 1  # the prefill sees the prompt, each decode step one token
            self.assertEqual(hidden[-1].shape[:2], (2, query))
            self.assertEqual(attention[0].shape[-2:], (query, prompt + step))

    # ---------------------------------------------------------------------------- sampling
    def test_sample_generate_is_seeded_and_top_k_1_is_greedy(self):
        model, inputs = self._model_and_inputs()
        greedy = model.generate(**inputs, **self._greedy_kwargs())
        sampled = model.generate(**inputs, **self._greedy_kwargs(do_sample=True, top_k=1))
        self._assert_same_tokens(sampled, greedy)
        runs = []
        for _ in range(2):
            torch.manual_seed(7)
            runs.append(model.generate(**inputs, **self._greedy_kwargs(do_sample=True, temperature=5.0, top_k=0, num_return_sequences=3)))
        self._assert_same_tokens(runs[0], runs[1], "sampling with the same seed differs")
        self.assertEqual(runs[0].shape[0], 2 * 3)
        prompt = inputs["input_ids"]
        for row, sample in enumerate(runs[0]):
            self._assert_same_tokens(sample[: prompt.shape[1]], prompt[row // 3])

    # -------------------------------------------------------------------------- beam search
    def test_beam_search_scores_are_the_log_probabilities_of_the_sequences(self):
        model, inputs = self._model_and_inputs()
        prompt = inputs["input_ids"].shape[1]
        one_beam = model.generate(**inputs, **self._greedy_kwargs(num_beams=1))
        self._assert_same_tokens(one_beam, model.generate(**inputs, **self._greedy_kwargs()))
        out = model.generate(
            **inputs, **self._greedy_kwargs(num_beams=3, num_return_sequences=2, length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
        )
        self.assertEqual(out.sequences.shape, (4, prompt + MAX_NEW_TOKENS))
        repeated = {key: value.repeat_interleave(2, dim=0) for key, value in inputs.items()}
        logits = self._reference_logits(model, repeated, out.sequences)
        new_tokens = out.sequences[:, prompt:]
        log_probs = logits.float().log_softmax(-1).gather(-1, new_tokens[..., None])[..., 0].sum(-1)
        torch.testing.assert_close(out.sequences_scores, log_probs, rtol=1e-4, atol=1e-4)
        self.assertTrue(bool((out.sequences_scores[0::2] >= out.sequences_scores[1::2]).all()), "beams are not best first")

    def test_beam_sample_generate_is_seeded(self):
        model, inputs = self._model_and_inputs()
        runs = []
        for _ in range(2):
            torch.manual_seed(3)
            runs.append(model.generate(**inputs, **self._greedy_kwargs(do_sample=True, num_beams=2, num_return_sequences=2, temperature=2.0)))
        self._assert_same_tokens(runs[0], runs[1])
        self.assertEqual(runs[0].shape[0], 4)

    # ------------------------------------------------------------------- assisted decoding
    def test_assisted_and_prompt_lookup_decoding_match_greedy(self):
        model, inputs = self._model_and_inputs()
        greedy = model.generate(**inputs, **self._greedy_kwargs())
        # Assisted decoding verifies one sample at a time.
        for row in range(2):
            sample = {key: value[row : row + 1] for key, value in inputs.items()}
            assistant = copy.deepcopy(model)
            with torch.no_grad():
                for param in assistant.model.language_model.parameters():
                    param.add_(torch.randn_like(param) * 0.05)  # a weaker draft model, so that some drafts are rejected
            assisted = model.generate(**sample, **self._greedy_kwargs(), assistant_model=assistant)
            self._assert_same_tokens(assisted, greedy[row : row + 1], "assisted decoding differs from greedy")
            lookup = model.generate(**sample, **self._greedy_kwargs(), prompt_lookup_num_tokens=2)
            self._assert_same_tokens(lookup, greedy[row : row + 1], "prompt-lookup decoding differs from greedy")

    # ---------------------------------------------------------- batching, padding, expansion
    def test_left_padding_gives_each_sample_its_unpadded_result(self):
        model, inputs = self._model_and_inputs()
        short = {key: value[:1] for key, value in inputs.items()}
        short["input_ids"], short["attention_mask"] = short["input_ids"][:, :-3], short["attention_mask"][:, :-3]
        long = {key: value[1:2] for key, value in inputs.items()}
        pad = model.config.text_config.pad_token_id
        padded = {
            "input_ids": torch.cat([torch.nn.functional.pad(short["input_ids"], (3, 0), value=pad), long["input_ids"]]),
            "attention_mask": torch.cat([torch.nn.functional.pad(short["attention_mask"], (3, 0), value=0), long["attention_mask"]]),
            **{key: value[:2] for key, value in inputs.items() if key.startswith("pixel_values_")},
        }
        kwargs = self._greedy_kwargs(output_logits=True, return_dict_in_generate=True)
        batch = model.generate(**padded, **kwargs)
        for row, alone in enumerate((short, long)):
            single = model.generate(**alone, **kwargs)
            self._assert_same_tokens(batch.sequences[row, -MAX_NEW_TOKENS:], single.sequences[0, -MAX_NEW_TOKENS:])
            torch.testing.assert_close(torch.stack(batch.logits, 1)[row], torch.stack(single.logits, 1)[0], rtol=1e-4, atol=1e-4)

    def test_num_return_sequences_and_beams_repeat_each_samples_images_as_a_group(self):
        """Sample 0 holds two images, sample 1 one: every returned sequence is its sample's own result."""
        model, inputs = self._model_and_inputs(batch_size=3)
        image_token = model.config.image_token_id
        n = model.config.num_visual_tokens
        ids = inputs["input_ids"]
        two_images = torch.cat([ids[0, :n], torch.full((n,), image_token), ids[0, n:]])
        one_image = torch.cat([torch.full((n,), ids[1, n].item()), ids[1]])  # same length, one image
        batch = {"input_ids": torch.stack([two_images, one_image]), "attention_mask": torch.ones(2, two_images.shape[0], dtype=torch.long)}
        pixels = {key: value[:3] for key, value in inputs.items() if key.startswith("pixel_values_")}  # sample 0: rows 0-1
        samples = [
            {"input_ids": batch["input_ids"][:1], "attention_mask": batch["attention_mask"][:1], **{k: v[:2] for k, v in pixels.items()}},
            {"input_ids": batch["input_ids"][1:], "attention_mask": batch["attention_mask"][1:], **{k: v[2:] for k, v in pixels.items()}},
        ]
        # Logits and beam scores, not only tokens: a random tiny model's argmax hardly depends on the
        # image. The references see each sample's images without any expansion.
        sampled = self._greedy_kwargs(do_sample=True, top_k=1, num_return_sequences=2, output_logits=True, return_dict_in_generate=True)
        out = model.generate(**batch, **pixels, **sampled)
        greedy = self._greedy_kwargs(output_logits=True, return_dict_in_generate=True)
        alone = [torch.stack(model.generate(**sample, **greedy).logits, 1) for sample in samples]
        torch.testing.assert_close(torch.stack(out.logits, 1), torch.cat([a.repeat_interleave(2, dim=0) for a in alone]), rtol=1e-4, atol=1e-4)
        beams = self._greedy_kwargs(num_beams=2, num_return_sequences=2, length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
        out = model.generate(**batch, **pixels, **beams)
        groups = [0, 1, 0, 1, 2, 2]  # rows s0, s0, s1, s1 -> their images in order
        repeated = {
            "input_ids": batch["input_ids"].repeat_interleave(2, dim=0),
            "attention_mask": batch["attention_mask"].repeat_interleave(2, dim=0),
            **{key: value[groups] for key, value in pixels.items()},
        }
        logits = self._reference_logits(model, repeated, out.sequences)
        new_tokens = out.sequences[:, batch["input_ids"].shape[1] :]
        log_probs = logits.float().log_softmax(-1).gather(-1, new_tokens[..., None])[..., 0].sum(-1)
        torch.testing.assert_close(out.sequences_scores, log_probs, rtol=1e-4, atol=1e-4)

    def test_generate_from_inputs_embeds_matches_input_ids(self):
        model, inputs = self._model_and_inputs()
        pixels = {key: value for key, value in inputs.items() if key.startswith("pixel_values_")}
        by_ids = model.generate(**inputs, **self._greedy_kwargs())
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        by_embeds = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **pixels, **self._greedy_kwargs())
        self._assert_same_tokens(by_embeds, by_ids[:, inputs["input_ids"].shape[1] :])

    def test_generate_continues_from_its_past_key_values(self):
        model, inputs = self._model_and_inputs()
        full = model.generate(**inputs, **self._greedy_kwargs())
        first = model.generate(**inputs, **self._greedy_kwargs(max_new_tokens=2, min_new_tokens=2), return_dict_in_generate=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 2, dtype=torch.long)], dim=1)
        rest = model.generate(
            input_ids=first.sequences,
            attention_mask=mask,
            past_key_values=first.past_key_values,
            **self._greedy_kwargs(max_new_tokens=MAX_NEW_TOKENS - 2, min_new_tokens=MAX_NEW_TOKENS - 2),
        )
        self._assert_same_tokens(rest, full)

    # --------------------------------------------------------------- static cache, compile
    def test_static_cache_matches_the_dynamic_cache(self):
        model, inputs = self._model_and_inputs()
        kwargs = self._greedy_kwargs(output_logits=True, return_dict_in_generate=True)
        dynamic = model.generate(**inputs, **kwargs)
        static = model.generate(**inputs, **kwargs, cache_implementation="static")
        self._assert_same_tokens(static.sequences, dynamic.sequences)
        torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), rtol=1e-5, atol=1e-5)

    def test_compiled_decode_steps_are_one_graph_and_match_eager(self):
        """Decode steps with a static cache compile with ``fullgraph=True`` (a graph break would raise).

        The ``eager`` backend traces with dynamo exactly as inductor would and skips code generation,
        so the check costs seconds; the benchmark compiles with inductor.
        """
        model, inputs = self._model_and_inputs()
        self.assertTrue(model._can_compile_fullgraph)
        kwargs = self._greedy_kwargs(output_logits=True, return_dict_in_generate=True, cache_implementation="static")
        eager = model.generate(**inputs, **kwargs)
        torch._dynamo.reset()
        compile_config = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
        compile_config._compile_all_devices = True  # compile on CPU too
        generation_config = GenerationConfig(**{**model.generation_config.to_dict(), "compile_config": compile_config})
        compiled = model.generate(**inputs, **kwargs, generation_config=generation_config)
        self.assertTrue(hasattr(model, "_compiled_call"), "generate did not compile the decode steps")
        self._assert_same_tokens(compiled.sequences, eager.sequences)
        torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), rtol=1e-5, atol=1e-5)
        # A text-only forward with labels (a training step on text) is one graph as well.
        text = {"input_ids": inputs["input_ids"][:, model.config.num_visual_tokens :], "use_cache": False}
        text["labels"] = text["input_ids"].clone()
        torch._dynamo.reset()
        whole = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
        with torch.no_grad():
            expected, got = model(**text), whole(**text)
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
