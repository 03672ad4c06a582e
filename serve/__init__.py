"""ctredge.serve"""
