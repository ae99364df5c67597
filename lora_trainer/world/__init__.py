"""A tiny world in which training visibly works.

* ``drawing``: the world's pictures (one flat shape of one colour on a flat background, with
  captions such as "a red circle on a blue background") and the characters a LoRA learns
  (``OHWX``: a yellow ring with a red dot, behind the trigger word "ohwx").
* ``model``: the pretrained tiny SD1.5-architecture model shipped in ``lora_trainer/assets/tiny_world``
  (built by ``tools/make_tiny_world.py``).
* ``dataset``: a character's training set in kohya layout.
* ``sample``: a deterministic DDIM sampler with classifier-free guidance.
* ``detect`` / ``score``: deterministic detectors and the learning score.
"""
