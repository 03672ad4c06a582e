"""ctredge.compress"""
