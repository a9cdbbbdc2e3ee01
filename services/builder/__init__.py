"""The builder: images made from a spec under the policy, verified, then pushed to its dc."""
