"""Training the Dovetail feature drafter: ``pipeline.run_train_draft`` drives corpus (``corpus``,
``answers``) -> target features (``features``) -> trained drafter (``trainer``)."""
